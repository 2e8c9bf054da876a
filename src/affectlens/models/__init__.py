"""Model adapters, one per architecture family, and `load_adapter` to pick one by family name."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads with the first adapter, not with the site grammar (the workflow's DAG)
    from affectlens.models.base import Adapter

# family -> "module:class"; imported on demand so one family's heavy imports never load another's.
# A class serving several families (`families`) is told which one it loads.
ADAPTERS = {
    "whisper": "affectlens.models.whisper:WhisperAdapter",
    "wav2vec2": "affectlens.models.speech:SpeechEncoderAdapter",
    "hubert": "affectlens.models.speech:SpeechEncoderAdapter",
    "wavlm": "affectlens.models.speech:SpeechEncoderAdapter",
    "data2vec-audio": "affectlens.models.speech:SpeechEncoderAdapter",
    "bert": "affectlens.models.text:TextEncoderAdapter",
    "qwen2-audio": "affectlens.models.qwen2_audio:Qwen2AudioAdapter",
    "qwen2.5-omni": "affectlens.models.qwen_omni:QwenOmniAdapter",
    "qwen3-omni": "affectlens.models.qwen_omni:QwenOmniAdapter",
    "rave": "affectlens.models.rave:RaveAdapter",
    "musicgen": "affectlens.models.musicgen:MusicgenAdapter",
    "qwen2-vl": "affectlens.models.qwen_vl:QwenVLAdapter",
    "qwen2.5-vl": "affectlens.models.qwen_vl:QwenVLAdapter",
}


def load_adapter(family: str, source: str, device: str = "cpu", dtype: str = "float32",
                 revision: str | None = None, device_map: str | dict | None = None,
                 towers: list[str] | tuple[str, ...] | None = None, options: dict | None = None) -> Adapter:
    """The adapter of `family` with weights from `source` (a Hub id, a folder, or a named package).
    `device="auto"` picks a GPU when present; `device_map` ("auto" or a module -> device dict)
    spreads a model too large for one GPU over several (the device is then ignored). `towers`
    names the towers wanted where a family makes some optional (Whisper's decoder). `options` (a
    model's config entry) passes on the keys the family's adapter takes (its `config_keys`, e.g.
    Qwen-Omni's speaker and speech_*); the others are ignored."""
    if family not in ADAPTERS:
        raise ValueError(f"model family {family!r} is unknown; the `family` key takes one of {sorted(ADAPTERS)}")
    from affectlens.models.loading import resolve_device

    module, name = ADAPTERS[family].split(":")
    cls = getattr(import_module(module), name)
    kwargs = {"device": resolve_device(device), "dtype": dtype, "revision": revision}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if getattr(cls, "families", None):
        kwargs["family"] = family
    optional = set(getattr(cls, "optional_towers", ())) & set(towers or ())
    if optional:
        kwargs["towers"] = tuple(dict.fromkeys([t for t in towers if t not in optional] + sorted(optional)))
    kwargs.update({k: v for k, v in (options or {}).items() if k in getattr(cls, "config_keys", ())})
    return cls.from_source(source, **kwargs)


def build_adapter(model) -> Adapter:
    """The one way a stage or the CLI builds the model a config entry describes (a `ModelConfig`
    or its mapping): family, weights, revision, device or device_map, the towers its sites name,
    and the family's own options. Extraction, patching, steering, SAE fidelity and tracing all
    run the model that extraction stored."""
    from affectlens.models.config import ModelConfig

    m = ModelConfig.from_dict(model)
    return load_adapter(m.family, m.source, device=m.device, dtype=m.dtype, revision=m.revision,
                        device_map=m.device_map, towers=m.towers, options=m.options())
