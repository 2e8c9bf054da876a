"""Qwen-Omni generating under interventions: the Thinker's text answer, and the Talker's speech codes.

Both generate greedily (deterministic) for one clip (its audio and the question in its text) with
interventions (`affectlens.models.base.Intervention`, e.g. `steering.vectors.add_vector`) installed
on sites for the whole generation. Each intervention is called on every forward the site's module
runs: the prompt's prefill ([1, prompt, d]) and then every generated step ([1, 1, d]), so a vector
added with `add_vector(v, alpha)` (all frames) steers every position the model computes. The hooks
are removed when generation ends, also on error.

- `generate_answer`: the Thinker's answer (token ids and text) under interventions on audio, vision
  or thinker sites (`steering.omni.token_similarity` and `chrf` compare a steered answer with the
  unsteered one).
- `generate_speech` (full model, see `QwenOmniAdapter.from_source(..., talker=True)`): the whole
  Thinker -> Talker -> codec pipeline of `transformers`' generate, with interventions on talker
  (and Qwen3-Omni's predictor) sites and, as well, thinker sites (which change the answer and so the
  Talker's input). It returns the codec codes (Qwen2.5-Omni: one code per frame; Qwen3-Omni: Q
  codebooks per frame) and the decoded 24 kHz wave, and can capture sites over the whole run,
  with `talker_positions` saying what each captured row is. With `decode=False` the run stops when
  the Talker has written its codes (no wave): what extraction of Talker sites runs per clip
  (`QwenOmniAdapter.generated_rows`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from affectlens.models.base import Intervention
from affectlens.models.positions import Positions
from affectlens.models.qwen_omni import SPEECH_SAMPLE_RATE, QwenOmniAdapter, codec_rate, talker_positions


@dataclass
class Answer:
    tokens: list[int]  # generated ids, without the end-of-turn token
    text: str


@dataclass
class Speech:
    answer: Answer  # the Thinker's answer the Talker spoke
    codes: np.ndarray  # [frame] (Qwen2.5-Omni) or [frame, codebook] (Qwen3-Omni), up to the codec's end
    wave: np.ndarray | None  # float32 mono at `sample_rate`, as the model's own decoder made it
    sample_rate: int
    codec_rate: float  # codec frames per second
    activations: dict[str, np.ndarray] = field(default_factory=dict)  # captured site -> [row, d]
    positions: dict[str, Positions] = field(default_factory=dict)  # tower -> what each row is


def _end_ids(adapter: QwenOmniAdapter) -> list[int]:
    tok = adapter.processor.tokenizer
    ends = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    return sorted(i for i in ends if isinstance(i, int) and i >= 0 and i != tok.unk_token_id)


def _answer(adapter: QwenOmniAdapter, ids) -> Answer:
    ends = set(_end_ids(adapter))
    tokens = [int(i) for i in ids]
    cut = next((k for k, t in enumerate(tokens) if t in ends), len(tokens))
    tokens = tokens[:cut]
    return Answer(tokens, adapter.processor.tokenizer.decode(tokens, skip_special_tokens=False))


def _one_clip(adapter: QwenOmniAdapter, clip: dict):
    if adapter.processor is None:
        raise ValueError(f"{adapter.model_id}: no processor; generation needs one (pass it to QwenOmniAdapter)")
    return adapter.prepare([clip])


@torch.inference_mode()
def generate_answer(adapter: QwenOmniAdapter, clip: dict, interventions: dict[str, Intervention] | None = None,
                    max_new_tokens: int = 32) -> Answer:
    """The Thinker's greedy answer to one clip ({"audio": 16 kHz wave, "text": question}) with
    `interventions` {site: fn} installed for every generation step."""
    batch = _one_clip(adapter, clip)
    prompt_len = batch.inputs["input_ids"].shape[1]
    with adapter.hooks(interventions):
        out = adapter.thinker.generate(**batch.inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=_end_ids(adapter), pad_token_id=_end_ids(adapter)[0])
    return _answer(adapter, out[0, prompt_len:])


class _SpeechWritten(Exception):
    """Ends a generation run once the Talker has returned its codes (the wave is not wanted)."""


@contextmanager
def _record_call(module, name: str, into: dict, stop: bool = False):
    """Replace module.name (a method) for the block by a wrapper that keeps its kwargs and result;
    with `stop`, the wrapper then raises `_SpeechWritten`, so nothing after the call runs."""
    original = getattr(module, name)
    shadowed = name in vars(module)  # already replaced on the instance (e.g. by a caller's recorder)

    def wrapper(*args, **kwargs):
        into["kwargs"] = kwargs
        into["result"] = original(*args, **kwargs)
        if stop:
            raise _SpeechWritten
        return into["result"]

    setattr(module, name, wrapper)
    try:
        yield into
    finally:
        if shadowed:
            setattr(module, name, original)
        else:
            delattr(module, name)


@torch.inference_mode()
def generate_speech(adapter: QwenOmniAdapter, clip: dict, interventions: dict[str, Intervention] | None = None,
                    capture: list[str] | tuple[str, ...] = (), speaker: str | None = None, max_answer_tokens: int = 32,
                    max_codes: int = 512, min_codes: int = 0, seed: int = 0, decode: bool = True) -> Speech:
    """The full model's spoken answer to one clip, greedy in the Thinker and the Talker (and the
    code predictor), with `interventions` on any sites installed for the whole run, and `capture`d
    sites returned as every row the site's module computed, in order ([row, d]; rows as
    `Speech.positions` say for talker/predictor sites, for thinker sites the prompt then the answer).

    speaker: a voice of the checkpoint (Qwen2.5-Omni: its spk_dict.pt, e.g. "Chelsie"; Qwen3-Omni:
    `talker_config.speaker_id`, e.g. "Ethan"); None takes the first. seed: Qwen2.5-Omni's DiT
    decodes from noise, drawn here from this seed (the caller's random state is left alone), so the
    same codes give the same wave. decode=False skips the codec decoder (`Speech.wave` is None);
    answer, codes and captured rows are those of a decoded run."""
    model = adapter.model
    if adapter.talker is None:
        raise ValueError(f"{adapter.model_id} is loaded as the Thinker alone; load it with "
                         "QwenOmniAdapter.from_source(..., talker=True) to generate speech")
    batch = _one_clip(adapter, clip)
    prompt_ids = batch.inputs["input_ids"][0]
    ends = _end_ids(adapter)
    kwargs = dict(thinker_max_new_tokens=max_answer_tokens, thinker_do_sample=False, thinker_eos_token_id=ends,
                  talker_max_new_tokens=max_codes, talker_min_new_tokens=min_codes, talker_do_sample=False)
    if adapter.family == "qwen2.5-omni":
        voices = list(model.speaker_map)
        kwargs["talker_eos_token_id"] = [adapter.talker.codec_pad_token, adapter.talker.codec_eos_token]
    else:
        voices = list(model.config.talker_config.speaker_id or {})
        kwargs["return_audio"] = True
        ids, cfg = prompt_ids.tolist(), model.config
        turns = [ids[k + 1] for k in range(len(ids) - 1) if ids[k] == cfg.im_start_token_id]
        if cfg.user_token_id not in turns or cfg.assistant_token_id not in turns:
            raise ValueError("Qwen3-Omni speaks from a chat prompt (a user turn, then the assistant turn's "
                             "'<|im_start|>assistant'), "
                             f"which the prompt of clip text {clip.get('text')!r} lacks; give the question as plain "
                             "text (the adapter wraps it in a user turn) or write both turns")
    if not voices:
        raise ValueError(f"{adapter.model_id}: no speaker voices (Qwen2.5-Omni reads them from spk_dict.pt beside "
                         "the weights; Qwen3-Omni from talker_config.speaker_id)")
    speaker = voices[0] if speaker is None else speaker
    if speaker not in voices and not (adapter.family == "qwen3-omni" and speaker.lower() in voices):
        raise ValueError(f"speaker {speaker!r}: this checkpoint has the voices {voices}")
    rows: dict[str, list[torch.Tensor]] = {s: [] for s in capture}

    def keep(act: torch.Tensor, site: str):  # kept on the model's device: one transfer per site at the end
        rows[site].append(act[0].detach().to(torch.float32, copy=True))

    thinker_call: dict = {}
    talker_call: dict = {}
    wave = None
    try:
        with torch.random.fork_rng(devices=[]), _record_call(adapter.thinker, "generate", thinker_call), \
                _record_call(adapter.talker, "generate", talker_call, stop=not decode), \
                adapter.hooks(interventions, capture, reduce=keep):
            torch.manual_seed(seed)
            _, wave = model.generate(**batch.inputs, speaker=speaker, **kwargs)
    except _SpeechWritten:
        pass
    sequences = thinker_call["result"].sequences
    answer = _answer(adapter, sequences[0, len(prompt_ids):])
    result = talker_call["result"]
    if adapter.family == "qwen2.5-omni":
        prefix = talker_call["kwargs"]["input_ids"].shape[1]
        generated = result[0, prefix:]
        stops = {adapter.talker.codec_pad_token, adapter.talker.codec_eos_token}
        codes = [int(c) for c in generated]
        codes = codes[:next((k for k, c in enumerate(codes) if c in stops), len(codes))]
        codes, n_rows = np.asarray(codes, dtype=np.int64), len(generated) - 1
        speaker_bos = int(model.speaker_map[speaker]["bos_token"])
    else:
        frames = [step[-1] for step in result.hidden_states if step[-1] is not None]
        q = adapter.talker.config.num_code_groups
        codes = torch.cat(frames, 0).cpu().numpy() if frames else np.zeros((0, q), np.int64)
        n_rows, speaker_bos = result.sequences.shape[1] - 1, None
    positions = talker_positions(adapter, adapter.positions(batch, "thinker")[0], prompt_ids.cpu().numpy(),
                                 sequences[0, len(prompt_ids):].cpu().numpy(), n_rows, speaker_bos)
    wave = wave[0] if isinstance(wave, list) else wave
    return Speech(answer, codes, None if wave is None else wave.reshape(-1).float().cpu().numpy(),
                  SPEECH_SAMPLE_RATE, codec_rate(model),
                  {s: torch.cat(r, 0).cpu().numpy() for s, r in rows.items() if r}, positions)
