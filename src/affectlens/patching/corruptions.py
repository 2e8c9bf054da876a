"""Where a patching run's corrupt input comes from: one registry of corruption strategies.

Each strategy (`patch.corruption` in the config) owns everything that depends on it: which pairs
are drawn, what it needs from the corpus before the first pair (the noise scale, the reference
speaking rate), how it builds the corrupt run of a pair, the sentence that describes it in the log
and the words that name it in a heatmap's title. `stages.patch.patch` and `stages.patch.heatmaps`
look it up here by name (`CORRUPTIONS`); the schema's `enum` lists the same names (tested).

- `pairs`: the source-label clip with the clean clip's pair_key (same speaker and sentence).
- `noise`: the clean clip itself with Gaussian noise on the first tower's embedding (ROME).
- `prosody_neutral`: the clean clip re-rendered with its prosody taken out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from affectlens.models.base import Intervention


@dataclass(frozen=True)
class CorruptionContext:
    """What a strategy may read while it is set up for one contrast (the store is open)."""

    params: Any  # settings.PatchConfig
    adapter: Any  # the model's adapter
    manifest: pd.DataFrame
    store: Any  # an open affectlens.store.Store
    store_path: Any
    sites: list[str]  # the sites patched
    embed: str  # the first tower's embedding site


class Corruption:
    """One strategy. Subclasses set `name`, build themselves with `setup` and make the corrupt run
    of a pair with `corrupt_run`; `noise_sigma` is stated in pairs.tsv and summary.tsv (NaN where
    the strategy adds no noise)."""

    name: ClassVar[str]
    noise_sigma: float = np.nan

    @classmethod
    def setup(cls, ctx: CorruptionContext) -> Corruption:
        return cls()

    def draw_pairs(self, manifest: pd.DataFrame, contrast: dict, n_pairs: int | None, seed: int,
                   label_column: str = "label") -> pd.DataFrame:
        """The strategies without a parallel clip pair each `target` clip with itself."""
        from affectlens.patching.pairs import self_pairs

        return self_pairs(manifest, contrast["target"], n_pairs, seed, label_column=label_column)

    def describe(self, contrast: dict) -> str:
        """The log's sentence for the corrupt run."""
        raise NotImplementedError

    def columns(self) -> dict[str, Any]:
        """Columns that state the corruption in summary.tsv."""
        return {"corruption": self.name, "noise_sigma": self.noise_sigma}

    def pair_columns(self) -> dict[str, Any]:
        """Columns that state the corruption in pairs.tsv."""
        return self.columns()

    def corrupt_run(self, adapter, clean_wave: np.ndarray, corrupt_path) -> tuple[Any, dict[str, Intervention] | None]:
        """The prepared corrupt input of one pair and the interventions to install on its run (None:
        none). `corrupt_path` is the pair's corrupt clip (the clean clip itself for self-pairs)."""
        raise NotImplementedError

    @classmethod
    def heading(cls, summary: pd.DataFrame) -> str:
        """How a heatmap's title names the corrupt run, from the summary table the stage wrote."""
        raise NotImplementedError


class PairedClip(Corruption):
    name = "pairs"

    def draw_pairs(self, manifest, contrast, n_pairs, seed, label_column="label"):
        from affectlens.patching.pairs import make_pairs

        return make_pairs(manifest, contrast["source"], contrast["target"], n_pairs, seed, label_column=label_column)

    def describe(self, contrast):
        return f"paired {contrast['source']} clip (same pair_key)"

    def corrupt_run(self, adapter, clean_wave, corrupt_path):
        from affectlens.data.decode import decode_clip

        return adapter.prepare([decode_clip(corrupt_path)]), None

    @classmethod
    def heading(cls, summary):
        return "paired clips"


@dataclass(frozen=True)
class EmbeddingNoise(Corruption):
    """N(0, sigma²) on the embedding site over the clip's real frames, sigma = `noise_factor` × the
    embedding's std over the corpus (`counterfactuals.embedding_noise`)."""

    name: ClassVar[str] = "noise"
    embed: str = ""
    noise_sigma: float = np.nan
    noise_factor: float = 3.0
    seed: int = 0

    @classmethod
    def setup(cls, ctx):
        from affectlens.patching.counterfactuals import corpus_std

        if ctx.embed not in ctx.sites:
            raise ValueError(f"patch.corruption: noise scales the noise by the corpus std of {ctx.embed}, which "
                             f"{ctx.store_path} lacks: add {ctx.embed!r} to the model's `sites`")
        sigma = ctx.params.noise_factor * corpus_std(ctx.store.frame_chunks(ctx.embed))
        return cls(embed=ctx.embed, noise_sigma=sigma, noise_factor=ctx.params.noise_factor, seed=ctx.params.seed)

    def describe(self, contrast):
        return (f"N(0, sigma = {self.noise_factor:g} x corpus std of {self.embed} = {self.noise_sigma:.4g}) "
                f"on {self.embed}")

    def corrupt_run(self, adapter, clean_wave, corrupt_path):
        from affectlens.patching.counterfactuals import embedding_noise

        corrupt = adapter.prepare([clean_wave])
        return corrupt, {self.embed: embedding_noise(self.noise_sigma, corrupt.n_frames, seed=self.seed)}

    @classmethod
    def heading(cls, summary):
        if "noise_sigma" not in summary:
            return "embedding noise"
        return f"embedding noise, sigma {summary['noise_sigma'].iloc[0]:.3g}"


@dataclass(frozen=True)
class ProsodyNeutral(Corruption):
    """The clip with speaking rate equalised to the corpus's typical rate (the median over a
    speaker-spread draw of `rate_reference_clips` clips of every label), pitch and energy
    flattened (`counterfactuals.prosody_neutral`)."""

    name: ClassVar[str] = "prosody_neutral"
    reference_rate: float | None = None

    @classmethod
    def setup(cls, ctx):
        import logging

        from affectlens.data.decode import decode_clip
        from affectlens.patching.counterfactuals import speaking_rate
        from affectlens.patching.pairs import draw_over_speakers

        sample = draw_over_speakers(ctx.manifest, ctx.params.rate_reference_clips, ctx.params.seed)
        rate = float(np.median([speaking_rate(decode_clip(p), ctx.adapter.sample_rate) for p in sample["path"]]))
        logging.getLogger("affectlens").info("prosody_neutral: reference speaking rate %.2f onsets/s over %d clips",
                                             rate, len(sample))
        return cls(reference_rate=rate)

    def describe(self, contrast):
        return "the clip with rate equalised, pitch and energy flattened"

    def pair_columns(self):
        return {**self.columns(), "reference_rate": self.reference_rate}

    def corrupt_run(self, adapter, clean_wave, corrupt_path):
        from affectlens.patching.counterfactuals import prosody_neutral

        return adapter.prepare([prosody_neutral(clean_wave, adapter.sample_rate, self.reference_rate)]), None

    @classmethod
    def heading(cls, summary):
        return "prosody-neutralised clips"


CORRUPTIONS: dict[str, type[Corruption]] = {c.name: c for c in (PairedClip, EmbeddingNoise, ProsodyNeutral)}


def corruption_strategy(name: str) -> type[Corruption]:
    """The strategy registered as `name` (the config's `patch.corruption`)."""
    try:
        return CORRUPTIONS[name]
    except KeyError:
        raise ValueError(f"patch.corruption: {name!r} is not one of {sorted(CORRUPTIONS)}") from None


def corruption_heading(summary: pd.DataFrame) -> str:
    """How a heatmap's title names the corrupt run of a patch summary (a summary without the
    column predates the other strategies: paired clips; an unknown name is shown as it is)."""
    name = summary["corruption"].iloc[0] if "corruption" in summary else "pairs"
    strategy = CORRUPTIONS.get(name)
    return strategy.heading(summary) if strategy is not None else str(name)
