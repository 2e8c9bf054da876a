"""A model's config entry (`models.<name>` of the workflow config) as a typed value, and the one rule
that picks its readout site. `build_adapter` (models/__init__.py) builds the adapter it describes."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any, Mapping

from affectlens.models.sites import GENERATED_TOWERS, parse_pattern


class SettingsError(ValueError):
    """A config section with a key its class does not know, or a value that names something absent;
    the message names the key."""


def build_section(cls, values: Mapping | None, key: str):
    """A frozen config dataclass from a (possibly partial) mapping; unknown keys name `key`."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SettingsError(f"{key}: unknown key(s) {unknown}; known: {sorted(known)}")
    missing = [f.name for f in fields(cls) if f.name not in values
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise SettingsError(f"{key}: missing required key(s) {missing}")
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
    trim: bool = False

    def __post_init__(self):
        if self.trim and self.family != "whisper":
            raise SettingsError(f"models.<name>.trim: only the whisper family pads its input (to 30 s) and can trim "
                                f"it; family {self.family!r} runs on each clip's own length already: drop `trim`")

    @classmethod
    def from_dict(cls, values: Mapping, key: str = "models.<name>") -> ModelConfig:
        if isinstance(values, cls):
            return values
        return build_section(cls, values, key)

    @property
    def towers(self) -> tuple[str, ...]:
        """The towers the configured sites live in, in the order they are first named."""
        return tuple(dict.fromkeys(parse_pattern(s).tower for s in self.sites))

    def options(self) -> dict:
        """The keys a family's adapter may take (`config_keys`), as a mapping."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def readout_site(configured: str | None, sites: list[str], generated_towers=GENERATED_TOWERS) -> str:
    """The one rule for the site whose pooled activation a downstream probe reads (patching's
    metric, steering's model-probe judge, the probe study's time-resolved probe and projection):
    the model's `readout_site` when `configured`, else the last of `sites` in store order (tower,
    then depth) that a prompt forward reaches (not a generated tower such as Qwen-Omni's Talker,
    read while speech is generated)."""
    if configured:
        if configured not in sites:
            raise SettingsError(f"models.*.readout_site {configured!r} is not among the stored sites {sites}")
        return configured
    reachable = [s for s in sites if parse_pattern(s).tower not in set(generated_towers)]
    if not reachable:
        raise SettingsError(f"no stored site can be read by a prompt forward (sites {sites}); set readout_site")
    return reachable[-1]
