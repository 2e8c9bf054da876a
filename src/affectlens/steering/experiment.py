"""A steering experiment on held-out speakers: model edits beside controls that could beat them.

For each held-out speaker everything learned is fit on the other speakers only (`fit_speaker`):
each method's edit at the steer site, random directions of the same norm, the activation -> mel
mapper at the hear site, the model-free mel shift, and the judges. Each chosen clip is rendered
(`render_clip`) through one path: the edit at the steer site propagates through every block up to
the hear site, the mapper turns the change of the hear site's activations into a mel change, and
`inversion.render_change` applies it. The controls go through the same path:

- `gain`: the original clip re-levelled to the primary method's (the difference of means, else the
  first method) steered file's active level, at each alpha;
- `mel_shift`: model-free: the per-speaker difference of class-mean log-mel spectra (target -
  source, other speakers), alpha times it on every frame, rendered like the model's change;
- `random`: random directions at the steer site with the norm of the primary method's vector,
  through the model, mapper and renderer (several seeds, averaged per clip).

Judges (`Judges.judge`) hear every output at one active level, so loudness cannot move them: the
steered model's probe at its readout site, the acoustic judge without absolute-level features, and
other models' probes (`judge_models`); the level change is measured on the raw output.
`compare_to_controls` gives the paired difference, clip by clip, of each method against each
control and the best control, with a 95 % t-interval over clips.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

CONTROLS = ("gain", "mel_shift", "random")


# --- what the run reads of the corpus ----------------------------------------------------------------
@dataclass
class Corpus:
    """The labelled clips, row-aligned with `manifest`: labels, speakers, waves at `sr`, pooled
    activations at the steer and readout sites, frames at the hear site, the mapper's mel targets,
    acoustic features of the level-normalised waves, and judge models' pooled activations."""

    manifest: pd.DataFrame
    labels: np.ndarray
    speakers: np.ndarray
    pair_keys: np.ndarray | None
    waves: list[np.ndarray]
    sr: int
    steer_pooled: np.ndarray
    read_pooled: np.ndarray
    hear_frames: list[np.ndarray]
    mel_targets: list[np.ndarray]
    acoustic: np.ndarray
    judge_pooled: dict[str, np.ndarray] = field(default_factory=dict)
    sae_latents: np.ndarray | None = None


def mean_spectra(mel_targets: list[np.ndarray], n_mels: int) -> np.ndarray:
    """[clip, n_mels]: each clip's mean log-mel spectrum from its mapper targets [frame, k*n_mels]."""
    return np.stack([t.reshape(-1, n_mels).mean(0) for t in mel_targets])


# --- per held-out speaker ---------------------------------------------------------------------
@dataclass
class JudgeModel:
    """Another model's probe as a judge: its adapter, readout site and probe fit on its store."""

    name: str
    adapter: object
    site: str
    probe: object


@dataclass
class Judges:
    """Everything that scores one output wave, fit without the held-out speaker."""

    target: str
    adapter: object
    readout_site: str
    probe: object
    acoustic: object
    others: list[JudgeModel]
    level_db: float
    sr: int
    asr: object | None = None
    speaker_similarity: Callable | None = None  # (original, [wave], sr) -> [similarity]
    n_jobs: int = 1

    @property
    def columns(self) -> list[str]:
        return judge_columns([j.name for j in self.others])

    def judge(self, wave: np.ndarray, original: np.ndarray, reference: str) -> tuple[dict, str]:
        """(numbers, transcript) of one output (`judge_many` of one wave)."""
        return self.judge_many([wave], original, reference)[0]

    def judge_many(self, waves: list[np.ndarray], original: np.ndarray, reference: str,
                   batch_size: int = 8) -> list[tuple[dict, str]]:
        """(numbers, transcript) per output wave of one clip: judges' P(target) at one active level,
        prosody and level of the raw output, word error rate against `reference`, speaker
        similarity to `original`. The probes' forwards and the transcripts run in batches of
        `batch_size`, the acoustic measures over `n_jobs` processes; each wave's numbers are those
        it gets alone (up to the batched forward's float rounding)."""
        from affectlens.acoustics import relevel
        from affectlens.steering.oneclip import pooled_frames
        from affectlens.steering.text import transcribe_many, word_error_rate

        levels = [relevel(w, self.sr, self.level_db) for w in waves]
        out = [{} for _ in waves]
        probes = [("p_target_model_probe", self.adapter, self.readout_site, self.probe)]
        probes += [(f"p_target_{j.name}", j.adapter, j.site, j.probe) for j in self.others]
        for column, adapter, site, probe in probes:
            p = probe.predict_proba(pooled_frames(adapter, levels, site, batch_size))[:, _index(probe, self.target)]
            for o, v in zip(out, p):
                o[column] = float(v)
        acoustic = _map(_acoustic_and_prosody, [(lv, w, self.sr) for lv, w in zip(levels, waves)], self.n_jobs)
        p = self.acoustic.predict_proba_features(np.stack([a for a, _ in acoustic]))[:, _index(self.acoustic, self.target)]
        for o, v, (_, pros) in zip(out, p, acoustic):
            o["p_target_acoustic"] = float(v)
            o |= pros
        transcripts = transcribe_many(self.asr, waves, batch_size) if self.asr is not None else [""] * len(waves)
        similarity = self.speaker_similarity(original, waves, self.sr) if self.speaker_similarity else None
        for i, o in enumerate(out):
            o["wer_vs_original"] = word_error_rate(reference, transcripts[i]) if self.asr is not None else np.nan
            o["speaker_similarity"] = float(similarity[i]) if similarity is not None else np.nan
        return [(o, t) for o, t in zip(out, transcripts)]


def judge_columns(others: list[str]) -> list[str]:
    """The judges' columns of an evaluation table: the steered model's probe, the acoustic judge,
    then the probe of each other judge model (`steer.judge_models`) by name."""
    return ["p_target_model_probe", "p_target_acoustic"] + [f"p_target_{name}" for name in others]


def _index(estimator, target: str) -> int:
    return list(estimator.classes_).index(target)


def _acoustic_and_prosody(level: np.ndarray, raw: np.ndarray, sr: int) -> tuple[np.ndarray, dict]:
    """The acoustic judge's features of the level-normalised wave, and the raw wave's prosody."""
    from affectlens.acoustics import acoustic_features, prosody

    return acoustic_features(level, sr), prosody(raw, sr)


def _map(fn, args: list[tuple], n_jobs: int) -> list:
    if n_jobs == 1 or len(args) < 2:
        return [fn(*a) for a in args]
    from joblib import Parallel, delayed

    return Parallel(n_jobs=n_jobs)(delayed(fn)(*a) for a in args)


@dataclass
class SpeakerFit:
    """What one held-out speaker's clips are steered and judged with (fit on the other speakers)."""

    edits: dict[str, Callable]  # method -> (alpha -> Intervention at the steer site)
    random_vectors: list[np.ndarray]  # one per seed, at the primary vector's norm
    mapper: object
    mel_shift: np.ndarray  # [n_mels], target - source
    judges: Judges


def fit_speaker(corpus: Corpus, speaker: str, source: str, target: str, methods: list[str], controls: list[str],
                n_seeds: int, seed: int, new_mapper: Callable, judges: Callable, sae=None,
                sae_features: int = 4) -> SpeakerFit:
    """Every method's edit, the controls' ingredients, the mapper and the judges, from the clips of
    speakers other than `speaker`; `judges(others, pair)` builds the Judges from row indices."""
    from affectlens.steering.methods import fit_steerer
    from affectlens.probes.axis import diff_of_means

    others = np.flatnonzero(corpus.speakers != speaker)
    pair = others[np.isin(corpus.labels[others], [source, target])]
    edits = {m: fit_steerer(m, corpus.steer_pooled[others], corpus.labels[others], corpus.speakers[others],
                            source, target,
                            pair_keys=None if corpus.pair_keys is None else corpus.pair_keys[others], sae=sae,
                            latents=None if corpus.sae_latents is None else corpus.sae_latents[others],
                            k_features=sae_features)
             for m in methods}
    primary = diff_of_means(corpus.steer_pooled[others], corpus.labels[others], corpus.speakers[others], source, target)
    randoms = random_directions(len(primary), float(np.linalg.norm(primary)), n_seeds, seed) if "random" in controls else []
    mapper = new_mapper().fit_targets([corpus.hear_frames[j] for j in others], [corpus.mel_targets[j] for j in others])
    spectra = mean_spectra([corpus.mel_targets[j] for j in others], mapper.n_mels)
    shift = diff_of_means(spectra, corpus.labels[others], corpus.speakers[others], source, target)
    return SpeakerFit(edits, randoms, mapper, shift, judges(others, pair))


def random_directions(d: int, norm: float, n: int, seed: int) -> list[np.ndarray]:
    """`n` random directions in R^d (isotropic Gaussian, seeds seed, seed+1, ...) scaled to `norm`."""
    out = []
    for s in range(n):
        v = np.random.default_rng(seed + s).standard_normal(d)
        out.append((v / np.linalg.norm(v) * norm).astype(np.float32))
    return out


def gain_control(wave: np.ndarray, edited: np.ndarray, sr: int) -> np.ndarray:
    """The `gain` control of an edit: the clip re-levelled to the level the edit is written at (files
    are kept inside full scale), as far as full scale allows (where it cannot, the control is quieter
    and its level column says by how much)."""
    from affectlens.acoustics import active_level_db, relevel, within_full_scale

    level = active_level_db(within_full_scale(edited), sr)
    return within_full_scale(relevel(wave, sr, level))


def fixed_change(shift: np.ndarray, alpha: float, n_grid: int) -> np.ndarray:
    """The `mel_shift` control's change: alpha * shift [n_mels] on every one of `n_grid` mel frames."""
    return np.tile(alpha * np.asarray(shift, np.float32), (n_grid, 1)).astype(np.float32)


# --- one clip ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Output:
    """One rendered output of a clip: which method or control, alpha, seed (random), wave, and the
    diagnostic of its mel change (`inversion.change_dependence`; NaN where there is none)."""

    method: str
    kind: str  # "original" | "method" | "control"
    alpha: float
    seed: int | None
    wave: np.ndarray
    change_dependence: float = float("nan")


def render_clip(adapter, wave: np.ndarray, fit: SpeakerFit, steer_site: str, hear_site: str, alphas: list[float],
                controls: list[str], mode: str, vocoder=None, primary: str = "diff_of_means") -> list[Output]:
    """The clip, then alpha = 0 once (every method and control leaves the clip as it is there: the
    round trip through the inversion path), then each method, and each control, per nonzero alpha."""
    from affectlens.steering.inversion import change_dependence, predicted_change, render_change
    from affectlens.steering.oneclip import site_frames
    from affectlens.steering.vectors import add_vector

    sr = adapter.sample_rate
    hear0 = site_frames(adapter, wave, hear_site)
    grid = len(hear0) * fit.mapper.upsample

    def render(change):
        return render_change(fit.mapper, hear0, change, wave, mode=mode, vocoder=vocoder, sr=sr)

    def through_model(intervention):
        steered = site_frames(adapter, wave, hear_site, {steer_site: intervention})
        change = predicted_change(fit.mapper, hear0, steered)
        return render(change), change_dependence(change, fit.mapper.upsample)

    outputs = [Output("none", "original", np.nan, None, wave)]
    if 0 in alphas:
        outputs.append(Output("all", "method", 0.0, None, render(np.zeros((grid, fit.mapper.n_mels), np.float32))))
    for alpha in [a for a in alphas if a != 0]:
        mine = {}
        for method, edit in fit.edits.items():
            out, dep = through_model(edit(alpha))
            mine[method] = out
            outputs.append(Output(method, "method", alpha, None, out, dep))
        for s, v in enumerate(fit.random_vectors):
            out, dep = through_model(add_vector(v, alpha))
            outputs.append(Output("random", "control", alpha, s, out, dep))
        if "mel_shift" in controls:
            outputs.append(Output("mel_shift", "control", alpha, None, render(fixed_change(fit.mel_shift, alpha, grid)),
                                  0.0))
        if "gain" in controls:
            if primary not in mine:
                raise ValueError(f"control gain matches the level of the {primary} edit: list it in steer.methods")
            outputs.append(Output("gain", "control", alpha, None, gain_control(wave, mine[primary], sr)))
    return outputs


def shared_zero(out: Output, methods: list[str], controls: list[str], n_seeds: int) -> list[Output]:
    """The evaluation rows of one output: itself, or for the alpha = 0 output (method "all") one
    row per method and control (random: per seed), which all share that one file and its numbers."""
    if out.method != "all":
        return [out]
    who = [(m, "method", None) for m in methods] + [(c, "control", None) for c in controls if c != "random"]
    who += [("random", "control", s) for s in range(n_seeds)]
    return [Output(m, kind, 0.0, s, out.wave, out.change_dependence) for m, kind, s in who]


# --- tables --------------------------------------------------------------------------------------------
def summarise(table: pd.DataFrame, judge_columns: list[str]) -> pd.DataFrame:
    """Per method or control (random: seeds averaged per clip first) and output: means over clips,
    and changes of pitch and level against alpha = 0 (the same inversion path)."""
    cols = judge_columns + ["f0_mean_hz", "f0_range_st", "active_rms_db", "wer_vs_original", "speaker_similarity",
                            "watermark_snr_db", "change_dependence"]
    per_clip = (table.groupby(["method", "kind", "output", "clip_id"], sort=False, dropna=False)
                .agg({"alpha": "first", **{c: "mean" for c in cols}}).reset_index())
    zero = per_clip[per_clip.output == "0"].drop_duplicates("clip_id").set_index("clip_id")
    rows = []
    for (method, kind, output), g in per_clip.groupby(["method", "kind", "output"], sort=False):
        row = {"method": method, "kind": kind, "output": output, "alpha": g["alpha"].iloc[0], "n_clips": len(g)}
        row |= {c: float(g[c].mean()) for c in cols}
        if len(zero):
            g = g.set_index("clip_id")
            base = zero.reindex(g.index)
            row["f0_change_st"] = float(np.nanmean(12 * np.log2(g["f0_mean_hz"] / base["f0_mean_hz"])))
            row["rms_change_db"] = float((g["active_rms_db"] - base["active_rms_db"]).mean())
        rows.append(row)
    return pd.DataFrame(rows)


def t_interval(x: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean of x (NaN bounds for fewer than 2 values)."""
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return np.nan, np.nan, np.nan
    m = float(x.mean())
    if len(x) < 2:
        return m, np.nan, np.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return m, m - half, m + half


def compare_to_controls(table: pd.DataFrame, judge_columns: list[str]) -> pd.DataFrame:
    """Per method, judge and nonzero alpha: the paired difference (method - control) over the
    clips, against each control and against the best control (the one whose mean score is highest
    at that alpha and judge), with a 95 % t-interval over clips; `beats` says the interval lies
    above 0. Random directions are averaged over seeds per clip first."""
    steered = table[(table.kind != "original") & (table.output != "0")]
    per_clip = steered.groupby(["method", "kind", "alpha", "clip_id"], sort=False)[judge_columns].mean().reset_index()
    rows = []
    for alpha, at in per_clip.groupby("alpha", sort=False):
        controls = {m: g.set_index("clip_id") for m, g in at[at.kind == "control"].groupby("method", sort=False)}
        for method, g in at[at.kind == "method"].groupby("method", sort=False):
            g = g.set_index("clip_id")
            for judge in judge_columns:
                if not controls:
                    continue
                best = max(controls, key=lambda c: controls[c][judge].mean())
                for name, c in [*controls.items(), ("best_control", controls[best])]:
                    common = g.index.intersection(c.index)
                    diff = g.loc[common, judge].to_numpy() - c.loc[common, judge].to_numpy()
                    mean, low, high = t_interval(diff)
                    rows.append({"method": method, "alpha": alpha, "judge": judge, "control": name,
                                 "best_control": best if name == "best_control" else name,
                                 "method_mean": float(g.loc[common, judge].mean()),
                                 "control_mean": float(c.loc[common, judge].mean()),
                                 "difference": mean, "ci_low": low, "ci_high": high, "n_clips": len(common),
                                 "beats": bool(np.isfinite(low) and low > 0)})
    return pd.DataFrame(rows, columns=["method", "alpha", "judge", "control", "best_control", "method_mean",
                                       "control_mean", "difference", "ci_low", "ci_high", "n_clips", "beats"])
