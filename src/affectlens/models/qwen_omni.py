"""Qwen2.5-Omni and Qwen3-Omni (Qwen3OmniMoe*): the Thinker with its audio and vision towers, and
with the full model (the Thinker, the Talker and the codec decoder) the Talker's towers too.

Towers and sites:
    audio.embed, audio.blocks.{L}.{point}      the audio encoder (Qwen2.5-Omni: 50 frames/s before
                                               its 2x pooling; Qwen3-Omni: 13 frames per second-long
                                               chunk of audio, one per LLM audio token)
    vision.embed, vision.blocks.{L}.{point}    the vision encoder's patches (images or video frames)
    thinker.embed, thinker.blocks.{L}.{point}  the Thinker LM over the whole prompt (mlp_out is
                                               the mixture-of-experts output in Qwen3-Omni)
    talker.embed, talker.blocks.{L}.{point}    the Talker LM (full model only): embed is its input
                                               after the projection from the Thinker's width
                                               (Qwen2.5-Omni's thinker_to_talker_proj; Qwen3-Omni
                                               projects the Thinker's states before summing them
                                               with codec embeddings); mlp_out is the Qwen3-Omni
                                               Talker's mixture of experts
    predictor.embed, predictor.blocks.{L}.{point}
                                               Qwen3-Omni's code predictor (full model only): for
                                               each codec frame a short sequence [Talker state,
                                               code of codebook 0, ..., code of codebook Q-2] that
                                               predicts codebooks 1..Q-1. Qwen2.5-Omni's Talker
                                               writes one code per frame and has no predictor.

A clip's input is its audio and text, plus video frames for a video source: the prompt holds the
placeholders (<|audio_start|><|audio_pad|><|audio_end|>, <|vision_start|><|video_pad|>
<|vision_end|>) or is put after them in a user turn. The processor expands each placeholder into
one token per audio frame / merged patch; Thinker positions say which rows are the audio span
(with each token's time), which are video tokens (with their frame), and which are text (with
their strings). The audio and vision encoders run on all real frames of the batch concatenated
([row, d], no padding); their positions index those rows.

Qwen3-Omni adds its vision "deepstack" features to the Thinker's hidden state after its first
blocks, outside the blocks: such a block's resid_post is before that addition.

The Talker runs only while speech is generated, after the Thinker has written its answer, so its
sites are not read by `forward` (the Thinker over the prompt: patching and Thinker extraction) but
by a generation run per clip. A clip's Talker activations (extraction into a store):

    the rows the Talker (and Qwen3-Omni's code predictor) computes while it speaks the Thinker's
    greedy answer to the clip under the model's prompt: `generate_speech` with the Thinker and the
    Talker greedy, the voice `speaker` (None: the checkpoint's first), at most
    `speech_max_answer_tokens` answer tokens and `speech_max_codes` codec steps (at least
    `speech_min_codes`), no wave decoded. Every row is kept, in the order the hooks see them
    (prefill, then one per step), and `talker_positions` says what each is: the prefix built from
    the prompt and the answer's first token (Qwen2.5-Omni: the whole prompt; Qwen3-Omni: its user
    turn, then 9 assistant rows; kinds audio/video/text, audio rows at their token times), then
    one row per codec frame fed back (kind code, time k / `codec_rate`). The pooled mean is over
    the code rows only: the states that write the speech ("how it speaks"), not the prefix, which
    the Talker reads before its first code; every predictor row is a code row.
    `Store.pooled(site, kind=...)` pools any other kind, and the stored rows are all there.

Thinker, audio and vision sites of the same store stay the prompt forward (batched as for every
family): the generation run captures only talker/predictor sites, so nothing it computes (the
Thinker's prefill and answer included) reaches a Thinker-side site. Generation is per clip
(batch of one); `generated_towers` tells extraction which towers are read this way
(`generated_rows`). `from_source` loads the Thinker alone (cheaper) unless `towers` names talker
or predictor, or `talker=True`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from affectlens.models.base import Adapter, Batch, block_hook_point
from affectlens.models.lm import prompt_positions
from affectlens.models.loading import input_device, load_pretrained, load_processor
from affectlens.models.positions import Positions, flat_positions, patch_positions
from affectlens.models.sites import GENERATED_TOWERS, Site, SiteError

SAMPLE_RATE = 16000
SPEECH_SAMPLE_RATE = 24000  # both families' codec decoders write 24 kHz speech (not in their configs)
TALKER_TOWERS = GENERATED_TOWERS
AUDIO = "<|audio_start|><|audio_pad|><|audio_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
# the `generate_speech` arguments that define a clip's Talker activations (config keys speaker, speech_*)
SPEECH_DEFAULTS = {"speaker": None, "max_answer_tokens": 32, "max_codes": 512, "min_codes": 0}


def _classes(family: str):
    import transformers

    if family == "qwen2.5-omni":
        return transformers.Qwen2_5OmniForConditionalGeneration, transformers.Qwen2_5OmniThinkerForConditionalGeneration
    return transformers.Qwen3OmniMoeForConditionalGeneration, transformers.Qwen3OmniMoeThinkerForConditionalGeneration


def audio_times(family: str, n_mel: int) -> tuple[np.ndarray, np.ndarray]:
    """(audio-encoder frame times, Thinker audio-token times) in seconds for n_mel mel frames (100/s)."""
    if family == "qwen2.5-omni":
        frames = (n_mel - 1) // 2 + 1  # conv stride 2: 50/s, pooled 2x into 25 tokens/s
        return np.arange(frames) / 50.0, np.arange((frames - 2) // 2 + 1) / 25.0
    full, rest = divmod(n_mel, 100)  # Qwen3-Omni: 1 s chunks, 13 frames each (3 stride-2 convs)
    last = (((rest - 1) // 2 + 1 - 1) // 2 + 1 - 1) // 2 + 1 if rest else 0
    t = np.concatenate([c + np.arange(13) * 0.08 for c in range(full)] + [full + np.arange(last) * 0.08])
    return t, t


def codec_rate(model: nn.Module) -> float:
    """Codec frames per second of the full model's speech: the 24 kHz output's samples per code.
    Qwen2.5-Omni: each code is `repeats` mel frames of the DiT, each mel frame the BigVGAN's product
    of upsample rates in samples (2 x 240 -> 50 codes/s); Qwen3-Omni: each frame of Q codes is the
    code2wav's total upsampling in samples (1920 -> 12.5 frames/s)."""
    if hasattr(model, "code2wav"):
        cfg = model.code2wav.config
        return SPEECH_SAMPLE_RATE / float(np.prod([*cfg.upsample_rates, *cfg.upsampling_ratios]))
    cfg = model.token2wav.config
    return SPEECH_SAMPLE_RATE / float(cfg.dit_config.repeats * np.prod(cfg.bigvgan_config.upsample_rates))


@dataclass
class GeneratedRows:
    """One clip's activations at sites read from a generation run (not from `forward`)."""

    frames: dict[str, np.ndarray]  # site -> [row, d] float32, every row the site's module computed
    positions: dict[str, Positions]  # tower -> what each row is
    pooled: dict[str, np.ndarray]  # site -> [d] float32: the mean over the code rows


class QwenOmniAdapter(Adapter):
    families = ("qwen2.5-omni", "qwen3-omni")
    optional_towers = TALKER_TOWERS
    generated_towers = TALKER_TOWERS  # extraction reads them with `generated_rows`, one clip at a time
    # model config keys `from_source` takes
    config_keys = ("speaker", "speech_max_answer_tokens", "speech_max_codes", "speech_min_codes")
    sample_rate = SAMPLE_RATE
    frame_rate = 50.0
    inputs = ("audio", "text")

    def __init__(self, model: nn.Module, model_id: str, revision: str = "", device: str | None = None, *,
                 family: str = "qwen3-omni", processor=None, speech: dict | None = None):
        if family not in self.families:
            raise ValueError(f"Qwen-Omni family {family!r}: choose one of {self.families}")
        thinker = getattr(model, "thinker", model)  # the full model, or a Thinker alone
        super().__init__(model, model_id, revision, str(input_device(thinker)) if device is None else device)
        self.family = family
        self.frame_rate = 50.0 if family == "qwen2.5-omni" else 13.0
        self.thinker = thinker
        self.audio_tower = thinker.model.audio_tower
        self.visual = thinker.model.visual
        self.lm_layers = thinker.model.language_model.layers
        self.processor = processor
        cfg = thinker.config
        self.placeholders = {cfg.audio_token_id: "audio", cfg.video_token_id: "video", cfg.image_token_id: "image"}
        # the full model with its speech half: the Talker LM, and Qwen3-Omni's code predictor
        self.talker = getattr(model, "talker", None) if getattr(model, "has_talker", False) else None
        self.talker_layers = self.talker.model.layers if self.talker is not None else None
        predictor = getattr(self.talker, "code_predictor", None)
        self.predictor_layers = predictor.model.layers if predictor is not None else None
        self._speech_sites: list[str] = []  # talker/predictor sites of the hooks installed now
        unknown = set(speech or {}) - set(SPEECH_DEFAULTS)
        if unknown:
            raise ValueError(f"speech settings {sorted(unknown)}: the settings are {sorted(SPEECH_DEFAULTS)}")
        # `generate_speech` arguments of the run that defines a clip's Talker activations (recorded in
        # the store's config digest, so a change redoes extraction)
        self.generation_settings = {**SPEECH_DEFAULTS, **(speech or {})}

    @classmethod
    def from_source(cls, source: str, device: str = "cpu", dtype: str = "float32", revision: str | None = None,
                    device_map=None, family: str = "qwen3-omni", towers: tuple[str, ...] | None = None,
                    talker: bool | None = None, speaker: str | None = None, speech_max_answer_tokens: int = 32,
                    speech_max_codes: int = 512, speech_min_codes: int = 0) -> QwenOmniAdapter:
        """The Thinker alone (cheaper: no Talker, no codec decoder), or the full model when `towers`
        names talker or predictor, or `talker=True` (e.g. to generate speech). speaker and speech_*:
        the generation run that defines a clip's Talker activations (module docstring)."""
        from transformers import AutoProcessor

        if family not in cls.families:
            raise ValueError(f"Qwen-Omni family {family!r}: choose one of {cls.families}")
        if talker is None:
            talker = bool(set(towers or ()) & set(TALKER_TOWERS))
        full, thinker = _classes(family)
        model, rev, where = load_pretrained(full if talker else thinker, source, revision, dtype, device, device_map)
        if talker and not getattr(model, "has_talker", False):
            raise ValueError(f"{source}: this checkpoint has no Talker (its config sets enable_audio_output "
                             "false); use Thinker sites only, or a checkpoint with the Talker's weights")
        speech = {"speaker": speaker, "max_answer_tokens": speech_max_answer_tokens, "max_codes": speech_max_codes,
                  "min_codes": speech_min_codes}
        return cls(model, source, rev, family=family, processor=load_processor(AutoProcessor, where, revision),
                   speech=speech)

    @property
    def n_blocks(self) -> dict[str, int]:
        blocks = {"audio": len(self.audio_tower.layers), "vision": len(self.visual.blocks),
                  "thinker": len(self.lm_layers)}
        if self.talker_layers is not None:
            blocks["talker"] = len(self.talker_layers)
        if self.predictor_layers is not None:
            blocks["predictor"] = len(self.predictor_layers)
        return blocks

    def _tower_error(self, site: str, tower: str) -> SiteError:
        if tower == "predictor" and self.family == "qwen2.5-omni":
            return SiteError(f"site {site}: Qwen2.5-Omni has no code predictor (its Talker writes one code per "
                             "frame); its speech sites are talker.*")
        if tower in TALKER_TOWERS and self.talker is None:
            return SiteError(f"site {site}: {self.model_id} is loaded as the Thinker alone; load the full model "
                             "(QwenOmniAdapter.from_source(..., talker=True), or list a talker/predictor site among "
                             "the model's configured `sites`) for the Talker's towers, which are read while speech "
                             "is generated (extraction, steering), never by a forward over the prompt (patching)")
        return SiteError(f"site {site}: {self.family} has the towers {sorted(self.n_blocks)}")

    @contextmanager
    def hooks(self, interventions=None, capture=(), reduce=None):
        """`Adapter.hooks`, with a message that says how to get a Talker tower the adapter lacks;
        remembers which speech sites are installed, so that `forward` can refuse to read them."""
        names = list(dict.fromkeys([*(interventions or {}), *capture]))
        for name in names:
            tower = name.split(".", 1)[0]
            if tower in TALKER_TOWERS and tower not in self.n_blocks:
                raise self._tower_error(name, tower)
        outer = self._speech_sites
        self._speech_sites = [n for n in names if n.split(".", 1)[0] in TALKER_TOWERS]
        try:
            with super().hooks(interventions, capture, reduce) as cache:
                yield cache
        finally:
            self._speech_sites = outer

    def _hook_point(self, site: Site) -> tuple[nn.Module, str]:
        if site.tower == "audio":
            return block_hook_point(self.audio_tower.layers, site, mlp="fc2")
        if site.tower == "vision":
            return block_hook_point(self.visual.blocks, site, attn="attn", mlp="mlp")
        if site.tower == "thinker":
            return block_hook_point(self.lm_layers, site)
        if site.tower == "talker" and self.talker_layers is not None:
            return block_hook_point(self.talker_layers, site)
        if site.tower == "predictor" and self.predictor_layers is not None:
            return block_hook_point(self.predictor_layers, site)
        raise self._tower_error(str(site), site.tower)

    def prompt(self, text: str, video: bool = False) -> str:
        """The clip's text as a prompt: kept when it holds the placeholders, else after them in a
        user turn (the processor's chat template when it has one)."""
        if "<|audio_pad|>" in text:
            return text
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "audio"}] + ([{"type": "video"}] if video else []) + [{"type": "text", "text": text}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=False)
        return (f"<|im_start|>user\n{VIDEO if video else ''}{AUDIO}{text}<|im_end|>\n<|im_start|>assistant\n")

    def prepare(self, clips: list[dict]) -> Batch:
        if self.processor is None:
            raise ValueError(f"{self.model_id}: no processor; pass one to QwenOmniAdapter")
        videos = [c.get("video") for c in clips]
        has_video = any(v is not None for v in videos)
        if has_video and not all(v is not None for v in videos):
            raise ValueError("a batch mixes clips with and without video; give every clip frames or none")
        waves = [np.asarray(c["audio"], dtype=np.float32) for c in clips]
        prompts = [self.prompt(c.get("text") or "", has_video) for c in clips]
        kwargs = {"videos": [v["frames"] for v in videos]} if has_video else {}
        enc = self.processor(text=prompts, audio=waves, return_tensors="pt", padding=True, padding_side="right",
                             **kwargs)
        n_mel = enc["feature_attention_mask"].sum(-1).tolist()
        times = [audio_times(self.family, n) for n in n_mel]
        positions = {"audio": flat_positions([_timed(t[0], "audio") for t in times]), "thinker": []}
        video_times = []
        if has_video:
            grids = enc["video_grid_thw"].tolist()
            merge = self.visual.spatial_merge_size
            temporal = getattr(self.visual.config, "temporal_patch_size", 2)
            per_frame, vision = [], []
            for (t, h, w), v in zip(grids, videos):
                ts = np.asarray(v.get("times", np.arange(len(v["frames"]))), dtype=np.float64)
                frame_time = ts[np.minimum(np.arange(t) * temporal, len(ts) - 1)]
                vision.append(patch_positions((t, h, w), "video", frame_time))
                per_frame.append((h * w) // merge**2)
                video_times.append(frame_time)
            positions["vision"] = flat_positions(vision)
        for i, (ids, mask) in enumerate(zip(enc["input_ids"].numpy(), enc["attention_mask"].numpy())):
            tokens = self.processor.tokenizer.convert_ids_to_tokens(ids.tolist())
            kinds_times, kinds_frames = {"audio": times[i][1]}, {}
            if has_video:
                n = per_frame[i]
                frames = np.repeat(np.arange(len(video_times[i])), n)
                kinds_frames["video"], kinds_times["video"] = frames, video_times[i][frames]
            positions["thinker"].append(prompt_positions(ids, mask, tokens, self.placeholders, kinds_times, kinds_frames))
        dtype = next(self.model.parameters()).dtype
        inputs = {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in enc.items() if isinstance(v, torch.Tensor)}
        meta = {"family": self.family, "flat_towers": {"audio", "vision"}}
        if has_video:
            meta["flat_rows"] = {"pixel_values_videos": [t * h * w for t, h, w in grids]}
        return Batch(inputs, [len(p) for p in positions["audio"]], meta, positions)

    def forward(self, batch: Batch) -> torch.Tensor:
        """The Thinker's next-token logits [clip, token, vocab]. The Talker does not run here (it
        needs the Thinker's answer): its sites are read by `generated_rows` and steered during
        generation (`affectlens.models.omni_generate`)."""
        if self._speech_sites:
            raise ValueError(f"{self.model_id}: the sites {self._speech_sites} belong to the Talker, which runs only "
                             "while speech is generated (affectlens.models.omni_generate.generate_speech), not in a forward "
                             "over the prompt, so they cannot be patched: patch audio, vision or thinker sites "
                             "(extraction reads Talker sites from a generation run per clip)")
        return self.thinker(**batch.inputs, use_cache=False).logits

    def generated_rows(self, clip: dict, sites: list[str]) -> GeneratedRows:
        """One clip's activations at talker/predictor `sites` as the module docstring defines them:
        every row of the greedy spoken answer under `generation_settings`, what each row is, and
        the means over the code rows."""
        from affectlens.models.omni_generate import generate_speech  # (the generation loop)

        wrong = [s for s in sites if s.split(".", 1)[0] not in self.generated_towers]
        if wrong:
            raise ValueError(f"generated_rows reads talker/predictor sites; {wrong} are read by `forward`")
        speech = generate_speech(self, clip, capture=sites, decode=False, **self.generation_settings)
        positions = {t: speech.positions[t] for t in dict.fromkeys(s.split(".", 1)[0] for s in sites)}
        pooled = {}
        for site in sites:
            pos = positions[site.split(".", 1)[0]]
            rows = speech.activations.get(site)
            if rows is None or len(rows) != len(pos):
                raise RuntimeError(f"{self.model_id}: {0 if rows is None else len(rows)} rows captured at {site}, "
                                   f"but the generation run has {len(pos)} positions there")
            code = pos.select("code")
            if not len(code):
                raise ValueError(f"the Talker wrote no codec frame it fed back ({len(speech.codes)} codes), so {site} "
                                 "has no code rows to pool; raise the model's `speech_min_codes` (e.g. to 2)")
            pooled[site] = rows[code].astype(np.float64).mean(0).astype(np.float32)
        return GeneratedRows(speech.activations, positions, pooled)


def _timed(times: np.ndarray, kind: str) -> Positions:
    n = len(times)
    return Positions(np.arange(n), np.full(n, kind, dtype=object), times, np.full(n, -1), np.full(n, "", dtype=object))


def _tokens(adapter: QwenOmniAdapter, ids) -> list[str]:
    return adapter.processor.tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def _code_rows(n: int, rate: float, labels: tuple[str, ...] = ("",)) -> Positions:
    """n codec frames, each as len(labels) rows at the frame's start time k / rate."""
    k = np.repeat(np.arange(n), len(labels))
    return Positions(np.arange(len(k)), np.full(len(k), "code", dtype=object), k / rate, np.full(len(k), -1),
                     np.asarray(list(labels) * n, dtype=object))


def talker_positions(adapter: QwenOmniAdapter, prompt: Positions, prompt_ids, reply_ids, n_code_rows: int,
                     speaker_bos: int | None = None) -> dict[str, Positions]:
    """What each position of the Talker (and Qwen3-Omni's code predictor) is in a speech generation
    run of one clip, as `transformers`' generate builds them; rows in the order the hooks see them.

    prompt: the Thinker positions of the clip's prompt (`Batch.positions["thinker"][0]`);
    prompt_ids: its token ids; reply_ids: the Thinker's answer (generated ids); n_code_rows: Talker
    steps after its prefix (codes it generated minus the last, which is never fed back);
    speaker_bos: Qwen2.5-Omni's text-start id of the speaker (its `speaker_map[speaker]["bos_token"]`).

    Qwen2.5-Omni's Talker: the whole prompt, row for row (each row is the Thinker's input embedding
    plus its final hidden state; audio/image/video rows keep only the hidden state), then the
    speaker's text-start token (plus the codec pad embedding) and the answer's first token (plus
    codec start), both kind text, then one row per code
    fed back (kind code, time k / codec_rate for code k; that row also carries answer token k + 1,
    then the text end and pad embeddings). Row r predicts the code after it, the last prefix row
    code 0.
    Qwen3-Omni's Talker: the user turn(s) of the prompt only (the system turn is dropped; audio,
    image and video rows are projected Thinker hidden states of the `accept_hidden_layer`, text rows
    projected Thinker input embeddings), then 9 assistant rows: the turn's `<|im_start|>`,
    `assistant`, newline, four tts-pad rows carrying the codec's no-think, think-start, think-end
    and speaker tokens, a tts-start row with codec pad, the answer's first token with codec start;
    then one row per codec frame fed back (the sum of its Q codebook embeddings plus answer token
    k + 1, then tts-end and tts-pad), kind code, time k / codec_rate.
    Qwen3-Omni's predictor: per codec frame k, Q rows [Talker state that predicted codebook 0,
    codebook 0, ..., codebook Q-2] at time k / codec_rate, named in `token`.
    Not determined: which time span of the *input* audio a Talker row attends to (attention, not
    position), and the exact start of the speech in the decoded wave (the decoders' warm-up)."""
    prompt_ids, reply_ids = np.asarray(prompt_ids), np.asarray(reply_ids)
    if len(prompt) != len(prompt_ids):
        raise ValueError(f"talker_positions: {len(prompt)} prompt positions but {len(prompt_ids)} prompt ids; "
                         "pass one clip's unpadded prompt")
    if adapter.talker is None:
        raise ValueError(f"{adapter.model_id}: loaded as the Thinker alone; it has no Talker positions")
    rate = codec_rate(adapter.model)
    reply = _tokens(adapter, reply_ids[:1]) or [""]
    if adapter.family == "qwen2.5-omni":
        bos = _tokens(adapter, [speaker_bos]) if speaker_bos is not None else ["<speaker text start>"]
        head = Positions(np.arange(2), ["text", "text"], [np.nan] * 2, [-1, -1], [*bos, *reply])
        return {"talker": _stack([prompt, head, _code_rows(n_code_rows, rate)])}
    cfg = adapter.model.config
    starts = np.flatnonzero(prompt_ids == cfg.im_start_token_id)
    role = np.full(len(prompt_ids), -1)
    for s in starts:
        role[s:] = prompt_ids[s + 1] if s + 1 < len(prompt_ids) else -1
    user = np.flatnonzero(role == cfg.user_token_id)
    assistant = [s for s in starts if s + 1 < len(prompt_ids) and prompt_ids[s + 1] == cfg.assistant_token_id]
    if not len(user) or not assistant:
        raise ValueError("talker_positions: the prompt needs a user turn and ends with '<|im_start|>assistant\\n' "
                         "(the chat template's generation prompt), as Qwen3-Omni's Talker is built from them")
    a = assistant[-1]
    turn = [str(t) for t in prompt.token[a:a + 3]]
    labels = turn + ["tts_pad+codec_nothink", "tts_pad+codec_think_bos", "tts_pad+codec_think_eos",
                     "tts_pad+codec_speaker", "tts_bos+codec_pad", f"{reply[0]}+codec_bos"]
    head = Positions(np.arange(9), ["text"] * 9, [np.nan] * 9, [-1] * 9, labels)
    q = adapter.talker.config.num_code_groups
    groups = ("talker_state", *(f"codebook_{g}" for g in range(q - 1)))
    return {"talker": _stack([prompt[user], head, _code_rows(n_code_rows, rate)]),
            "predictor": _code_rows(n_code_rows, rate, groups)}


def _stack(parts: list[Positions]) -> Positions:
    """Tables concatenated as one sequence: rows re-indexed 0..n-1."""
    p = Positions.concat(parts)
    return Positions(np.arange(len(p)), p.kind, p.time, p.frame, p.token)
