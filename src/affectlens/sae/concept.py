"""Finding a concept among SAE features, and sparse probing in SAE space.

A concept is a set of clips that have it (a guitar, an angry voice, the user's own recordings)
against clips that do not. `rank_features` orders the features by how well they separate the
two (Cohen's d of the clip-mean latent, with AUROC and mean difference beside it);
`feature_statistics` adds what says whether a feature's separation is more than chance: an AUROC
interval from a bootstrap over groups (speakers), a one-sided permutation p-value (the feature is
more active with the concept) and the Benjamini-Hochberg q-value across all features tested.
`sparse_probe` asks how much of the concept the best k features carry: a linear probe on only
those k features, cross-validated with the features chosen on the training folds (no peeking at
the test clips) and speakers held out together. `find_concept` does all of it for two lists of
clips through a model and an SAE (`data.concepts.concept_clips` lists a folder's clips and groups).

Groups. Clips of one speaker are not independent, so every resampling moves whole groups: the
bootstrap draws groups with replacement, cross-validation holds a group out whole, and the
permutation null shuffles labels within each group holding clips of both sides (a speaker's own
mix is kept, so a speaker-label confound cannot look like the concept) and permutes the labels of
whole groups among the groups holding one side only (every clip its own group: a plain shuffle).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control

from affectlens.probes.stats import percentile_interval, within_group_permutations
from affectlens.sae.features import auroc, clip_features, effect_size, peak_frames, top_activating

if TYPE_CHECKING:
    import torch

CORRECTION = "Benjamini-Hochberg"
PERMUTATION_CHUNK = 1024  # permutations scored at once ([chunk, clip] @ [clip, feature])


def rank_features(acts: np.ndarray, positive) -> pd.DataFrame:
    """One row per feature, best first: `rank`, `feature`, `effect_size` (Cohen's d of the clip
    activation, with vs without), `auroc`, `mean_with`, `mean_without`, `mean_difference`,
    `density_with`, `density_without` (share of clips where the feature is active)."""
    acts = np.asarray(acts, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        raise ValueError(f"a concept needs clips with and without it; got {int(positive.sum())} with and "
                         f"{int((~positive).sum())} without")
    pos, neg = acts[positive], acts[~positive]
    table = pd.DataFrame({
        "feature": np.arange(acts.shape[1]),
        "effect_size": effect_size(acts, positive),
        "auroc": auroc(acts, positive),
        "mean_with": pos.mean(0), "mean_without": neg.mean(0),
        "mean_difference": pos.mean(0) - neg.mean(0),
        "density_with": (pos > 0).mean(0), "density_without": (neg > 0).mean(0),
    })
    # Features that never fire on these clips carry no evidence: last, whatever their NaN d says.
    table["effect_size"] = table["effect_size"].fillna(0.0)
    table = table.sort_values(["effect_size", "auroc"], ascending=False, kind="stable", ignore_index=True)
    table.insert(0, "rank", np.arange(len(table)))
    return table


# -- the statistics -----------------------------------------------------------------------------

def permutations_needed(n_tested: int, alpha: float) -> int:
    """The fewest permutations whose resolution lets one lone feature reach a BH q <= alpha among
    `n_tested` (q = n_tested * p for the best p, and p >= 1 / (1 + n_permutations)); at least 999."""
    return max(999, math.ceil(n_tested / alpha) - 1)


def concept_permutations(positive, groups, n_permutations: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """([n_permutations, clip] bool labels, a sentence saying how they were drawn): labels shuffled
    within each group holding clips of both sides (`probes.stats.within_group_permutations`), and
    the labels of whole one-sided groups permuted among those groups."""
    positive = np.asarray(positive, dtype=bool)
    groups = np.asarray(groups).astype(str)
    names, index = np.unique(groups, return_inverse=True)
    n_pos = np.bincount(index, weights=positive, minlength=len(names))
    size = np.bincount(index, minlength=len(names))
    crossed = (n_pos > 0) & (n_pos < size)
    out = np.empty((n_permutations, len(positive)), dtype=bool)
    in_crossed = crossed[index]
    if in_crossed.any():
        out[:, in_crossed] = within_group_permutations(positive[in_crossed], index[in_crossed], n_permutations, rng)
    one_sided = np.flatnonzero(~crossed)
    if len(one_sided):
        side = n_pos[one_sided] > 0  # [group] the group's side
        shuffled = rng.permuted(np.broadcast_to(side, (n_permutations, len(side))), axis=1)
        where = np.full(len(names), -1)
        where[one_sided] = np.arange(len(one_sided))
        out[:, ~in_crossed] = shuffled[:, where[index[~in_crossed]]]
    how = []
    if crossed.any():
        how.append(f"shuffled within each of the {int(crossed.sum())} groups holding clips of both sides")
    if len(one_sided):
        what = "clips" if size[one_sided].max() == 1 else "one-sided groups (whole groups move)"
        how.append(f"permuted among the {len(one_sided)} {what}")
    return out, "labels " + "; ".join(how)


def _cohens_d_rows(P: np.ndarray, X: np.ndarray, sums: tuple[np.ndarray, np.ndarray], tol: np.ndarray) -> np.ndarray:
    """[perm, feature] Cohen's d of the columns of X (centred) for each row of labels P [perm, clip]
    (one pass over sums, so that the observed labels and a permutation equal to them score alike)."""
    total, total_sq = sums
    Pf = P.astype(X.dtype)
    n1 = Pf.sum(1, keepdims=True)
    n0 = X.shape[0] - n1
    s1, q1 = Pf @ X, Pf @ (X * X)
    s0, q0 = total - s1, total_sq - q1
    ss = np.maximum(q1 - s1 * s1 / np.maximum(n1, 1), 0) + np.maximum(q0 - s0 * s0 / np.maximum(n0, 1), 0)
    pooled = np.sqrt(ss / np.maximum(n1 + n0 - 2, 1))
    diff = s1 / np.maximum(n1, 1) - s0 / np.maximum(n0, 1)
    flat = pooled <= tol
    with np.errstate(divide="ignore", invalid="ignore"):
        d = diff / np.where(flat, 1.0, pooled)
    d[flat] = np.where(np.abs(diff[flat]) <= tol[np.nonzero(flat)[1]], 0.0, np.copysign(np.inf, diff[flat]))
    return d


def permutation_p_values(acts: np.ndarray, positive, groups, n_permutations: int, seed: int = 0
                         ) -> tuple[np.ndarray, float, str]:
    """(p [feature], resolution, how the null was drawn): one-sided permutation p-values of each
    feature's Cohen's d (more active with the concept), p = (1 + #{null d >= observed d}) /
    (1 + n_permutations), never below the resolution 1 / (1 + n_permutations)."""
    X = np.asarray(acts, dtype=np.float64)
    X = X - X.mean(0)  # d is shift-invariant; centring keeps the one-pass sums accurate
    positive = np.asarray(positive, dtype=bool)
    sums = (X.sum(0), (X * X).sum(0))
    tol = 1e-6 * np.maximum(np.abs(X).max(0), 1e-30)  # below it a pooled sd is rounding of a constant
    observed = _cohens_d_rows(positive[None], X, sums, tol)[0]
    rng = np.random.default_rng(seed)
    at_least = np.zeros(X.shape[1], dtype=np.int64)
    how = ""
    for start in range(0, n_permutations, PERMUTATION_CHUNK):
        P, how = concept_permutations(positive, groups, min(PERMUTATION_CHUNK, n_permutations - start), rng)
        at_least += (_cohens_d_rows(P, X, sums, tol) >= observed - 1e-12).sum(0)
    return (1 + at_least) / (1 + n_permutations), 1 / (1 + n_permutations), how


def group_bootstrap_auroc(scores: np.ndarray, positive, groups, n_boot: int = 1000, seed: int = 0,
                          confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) [feature]: percentile interval of each column's AUROC over bootstrap draws of
    whole groups (a draw holding no clip of one side is left out). Ties count half, as in `auroc`.
    A draw weights each clip by how often its group was drawn; with every column sorted once, a
    draw's Mann-Whitney count is the positive weights times the negative weight below them (plus
    half of the tied), read off one cumulative sum per column."""
    S = np.asarray(scores, dtype=np.float64)
    n, m = S.shape
    positive = np.asarray(positive, dtype=bool)
    _, g = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    G = int(g.max()) + 1
    draws = np.random.default_rng(seed).integers(0, G, (n_boot, G))
    counts = np.zeros((n_boot, G), dtype=np.float32)  # small integers: float32 sums stay exact
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    weights = counts[:, g]  # [draw, clip]
    order = np.argsort(S.T, axis=1, kind="stable")  # [feature, k]: the clip at sorted position k
    s = np.take_along_axis(S.T, order, axis=1)
    k = np.broadcast_to(np.arange(n), (m, n))
    first = np.ones((m, n), dtype=bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    last = np.ones((m, n), dtype=bool)
    last[:, :-1] = first[:, 1:]
    start = np.maximum.accumulate(np.where(first, k, 0), axis=1)  # where each tie block starts ...
    stop = np.minimum.accumulate(np.where(last, k, n - 1)[:, ::-1], axis=1)[:, ::-1] + 1  # ... and ends
    row = (np.arange(m) * (n + 1))[:, None]
    at_start, at_stop = (start + row).ravel(), (stop + row).ravel()
    below = np.zeros((m, n + 1), dtype=np.float32)  # [feature, k]: negative weight of sorted positions < k
    out = np.full((n_boot, m), np.nan)
    for b in range(n_boot):
        wp, wn = weights[b] * positive, weights[b] * ~positive
        if wp.sum() == 0 or wn.sum() == 0:
            continue
        np.cumsum(wn[order], axis=1, out=below[:, 1:])
        flat = below.ravel()
        ties_half = 0.5 * (flat[at_start] + flat[at_stop])  # below the block + half of the block
        out[b] = (wp[order].ravel() * ties_half).reshape(m, n).sum(1, dtype=np.float64) / (
            float(wp.sum()) * float(wn.sum()))
    return percentile_interval(out, confidence)


def feature_statistics(acts: np.ndarray, positive, groups=None, n_permutations: int | None = None,
                       n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """(table, summary). The table is `rank_features` (every feature, best first) with `auroc_low`,
    `auroc_high` (95 % bootstrap over groups), `p_value` (one-sided permutation test of d),
    `q_value` (Benjamini-Hochberg across the tested features) and `significant` (q <= alpha).
    Features that fire on no clip cannot separate anything under any permutation and are not
    tested (`tested` False, p and q empty), which is label-blind and so keeps the correction valid.
    `groups` (speakers; None = every clip its own group) drive the bootstrap and the null.
    `n_permutations` None = `permutations_needed` for the tested features. The summary says how
    many clips, groups, permutations, the resolution, the null and the correction."""
    acts = np.asarray(acts, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    groups = np.arange(len(positive)).astype(str) if groups is None else np.asarray(groups).astype(str)
    if len(groups) != len(positive) or len(acts) != len(positive):
        raise ValueError(f"{len(acts)} clips of activations, {len(positive)} labels, {len(groups)} groups: "
                         "give one label and one group per clip")
    table = rank_features(acts, positive)
    tested = (acts > 0).any(0)
    idx = np.flatnonzero(tested)
    n_perm = permutations_needed(len(idx), alpha) if n_permutations is None else int(n_permutations)
    p = np.full(acts.shape[1], np.nan)
    q = np.full(acts.shape[1], np.nan)
    low, high = np.full(acts.shape[1], np.nan), np.full(acts.shape[1], np.nan)
    resolution, how = (1 / (1 + n_perm), "")
    if len(idx):
        low[idx], high[idx] = group_bootstrap_auroc(acts[:, idx], positive, groups, n_boot=n_boot, seed=seed)
        if n_perm > 0:
            p[idx], resolution, how = permutation_p_values(acts[:, idx], positive, groups, n_perm, seed=seed)
            q[idx] = false_discovery_control(p[idx], method="bh")
    f = table["feature"].to_numpy()
    table.insert(table.columns.get_loc("auroc") + 1, "auroc_low", low[f])
    table.insert(table.columns.get_loc("auroc") + 2, "auroc_high", high[f])
    table["p_value"], table["q_value"], table["tested"] = p[f], q[f], tested[f]
    table["significant"] = tested[f] & (q[f] <= alpha)
    n_groups = len(np.unique(groups))
    summary = {
        "n_with": int(positive.sum()), "n_without": int((~positive).sum()), "n_groups": n_groups,
        "n_features": int(acts.shape[1]), "n_tested": int(len(idx)), "n_permutations": n_perm,
        "p_resolution": resolution, "test": "one-sided permutation test of Cohen's d (more active with the concept)",
        "null": how, "correction": f"{CORRECTION} q across the {len(idx)} tested features",
        # the smallest q a feature can get when it alone reaches the smallest p
        "lone_feature_q_floor": min(1.0, len(idx) * resolution) if len(idx) else float("nan"),
        "alpha": alpha, "n_significant": int(table["significant"].sum()),
        "auroc_interval": f"95% percentile bootstrap over the {n_groups} groups, {n_boot} draws",
    }
    return table, summary


# -- the sparse probe ---------------------------------------------------------------------------

def _top_features(acts: np.ndarray, positive: np.ndarray, k: int) -> np.ndarray:
    d = np.nan_to_num(effect_size(acts, positive), nan=0.0, posinf=1e6, neginf=-1e6)
    return np.argsort(-d, kind="stable")[:k]


def sparse_probe(acts: np.ndarray, y, groups=None, ks: Sequence[int] = (1, 2, 4, 8, 16, 32),
                 positive_label=None, n_splits: int = 4, C: float = 1.0, seed: int = 0,
                 n_boot: int = 1000) -> pd.DataFrame:
    """Accuracy of a linear probe that sees only the k best features, for each k in `ks`.

    `y` holds labels (or booleans); the concept is `y == positive_label` (True when y is boolean).
    Per fold, the k features with the largest effect size on the training clips are chosen and a
    LinearProbe (balanced classes) is fit on them; `groups` (speakers; None = one group per clip)
    never straddle a fold. Returns one row per k: `k`, `accuracy`, `balanced_accuracy` (means
    over folds), `auroc` of the pooled out-of-fold probabilities with `auroc_low`, `auroc_high`
    (95 % bootstrap over groups), `chance` (the majority share), `n_folds`, `features` (the k
    best on all clips, for reading)."""
    from affectlens.probes.linear import LinearProbe
    from affectlens.probes.sweep import grouped_splits

    acts = np.asarray(acts, dtype=np.float64)
    y = np.asarray(y)
    positive = y.astype(bool) if positive_label is None else (y == positive_label)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    splits = grouped_splits(positive, groups, n_splits=min(n_splits, len(np.unique(groups))), seed=seed)
    rows = []
    for k in ks:
        k = min(int(k), acts.shape[1])
        acc, bal = [], []
        scores = np.full(len(y), np.nan)
        for tr, te in splits:
            if positive[tr].all() or not positive[tr].any():
                continue
            feats = _top_features(acts[tr], positive[tr], k)
            probe = LinearProbe(C=C, class_weight="balanced").fit(acts[tr][:, feats], positive[tr])
            pred = probe.predict(acts[te][:, feats])
            scores[te] = probe.predict_proba(acts[te][:, feats])[:, list(probe.classes_).index(True)]
            acc.append(float((pred == positive[te]).mean()))
            per_class = [float((pred[positive[te] == c] == c).mean()) for c in (True, False)
                         if (positive[te] == c).any()]
            bal.append(float(np.mean(per_class)))
        scored = np.isfinite(scores)
        au, lo, hi = (float("nan"),) * 3
        if positive[scored].any() and (~positive[scored]).any():
            au = float(auroc(scores[scored, None], positive[scored])[0])
            lo, hi = (float(v[0]) for v in group_bootstrap_auroc(scores[scored, None], positive[scored],
                                                                 groups[scored], n_boot=n_boot, seed=seed))
        rows.append({"k": k, "accuracy": float(np.mean(acc)) if acc else float("nan"),
                     "balanced_accuracy": float(np.mean(bal)) if bal else float("nan"),
                     "auroc": au, "auroc_low": lo, "auroc_high": hi,
                     "chance": float(max(positive.mean(), 1 - positive.mean())), "n_folds": len(acc),
                     "features": " ".join(map(str, _top_features(acts, positive, k)))})
    return pd.DataFrame(rows)


def probe_ks(top_k: int) -> tuple[int, ...]:
    """The sparse probe's feature counts for a concept: 1, 2, 4, ... below `top_k`, then `top_k`."""
    return tuple(sorted({2 ** i for i in range(max(1, top_k).bit_length()) if 2 ** i < top_k} | {max(1, top_k)}))


# -- clips, and the whole finder ----------------------------------------------------------------

class Concept(NamedTuple):
    features: pd.DataFrame
    """`feature_statistics`: every feature, best first, with its interval, p and q."""
    probe: pd.DataFrame
    """`sparse_probe`: cross-validated accuracy and AUROC of the top-k features, per k."""
    top_clips: pd.DataFrame
    """The top `top_k` features' most activating clips (feature_rank, feature, rank, clip_id, path,
    concept, group, activation, peak_frame, peak_s, ...)."""
    clips: pd.DataFrame
    """clip_id, path, concept ("with" / "without"), group: the rows of `acts`."""
    acts: np.ndarray
    """[clip, n_latents] clip activations (frame latents averaged over each clip's real frames)."""
    summary: dict
    """`feature_statistics`' summary, with the site."""


def _clip_ids(side: str, clips: Sequence) -> list[str]:
    """`{side}/{path relative to the clips' common folder}`: unique, and readable in a table."""
    names = [str(c) for c in clips]
    try:
        common = os.path.commonpath(names) if len(names) > 1 else os.path.dirname(names[0])
    except ValueError:  # mixed absolute and relative paths
        common = ""
    rel = [os.path.relpath(n, common) if common else n for n in names]
    if len(set(rel)) < len(rel) or any(r in (".", "") for r in rel):
        rel = [f"{i:05d}" for i in range(len(names))]
    return [f"{side}/{r}" for r in rel]


def find_concept(sae: torch.nn.Module, adapter, site: str, with_clips: Sequence, without_clips: Sequence,
                 with_groups: Sequence[str] | None = None, without_groups: Sequence[str] | None = None, *,
                 load_wave: Callable | None = None, storage_dtype: str = "float16", batch_size: int = 8,
                 n_permutations: int | None = None, n_boot: int = 1000, alpha: float = 0.05, top_k: int = 10,
                 top_clips: int = 5, n_splits: int = 4, seed: int = 0, work_dir: str | Path | None = None) -> Concept:
    """A concept from clips with it and clips without it, read by `sae` at `site` of `adapter`.

    The clips (audio paths, or anything `load_wave` reads) go through the project's extraction into
    a temporary store (in `work_dir`, else a temporary folder; `storage_dtype` as the SAE's training
    store had it), are encoded frame by frame and averaged per clip. Groups (speakers) default to
    one per clip. Returns the features ranked with their statistics (`feature_statistics`), the
    sparse probe on the top 1, 2, 4 ... `top_k` features (`sparse_probe`, folds grouped), and the
    `top_clips` most activating clips of each of the `top_k` best features, with the time of the
    frame where it peaks."""
    from affectlens.data.decode import decode_clip
    from affectlens.extract import clip_loader, extract_store
    from affectlens.store import Store

    if not len(with_clips) or not len(without_clips):
        raise ValueError(f"a concept needs clips with and without it; got {len(with_clips)} with and "
                         f"{len(without_clips)} without")
    groups = []
    for side, clips, g in (("with", with_clips, with_groups), ("without", without_clips, without_groups)):
        if g is not None and len(g) != len(clips):
            raise ValueError(f"{len(g)} groups for {len(clips)} clips {side} the concept")
        groups += [str(x) for x in g] if g is not None else [f"{side}/{c}" for c in clips]
    clips = pd.DataFrame({"clip_id": _clip_ids("with", with_clips) + _clip_ids("without", without_clips),
                          "path": [str(c) for c in [*with_clips, *without_clips]],
                          "concept": ["with"] * len(with_clips) + ["without"] * len(without_clips),
                          "group": groups})
    positive = (clips["concept"] == "with").to_numpy()
    load_wave = load_wave or (lambda path: decode_clip(path, sr=adapter.sample_rate))
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="concept-") as tmp:
        store_path = extract_store(clips.assign(text=""), adapter, [site], Path(tmp) / "clips.h5",
                                   load_clip=clip_loader(adapter, load_wave), batch_size=batch_size,
                                   storage_dtype=storage_dtype, progress=False)
        with Store(store_path) as store:
            if store.dim(site) != sae.cfg.d_in:
                raise ValueError(f"the SAE reads {sae.cfg.d_in}-dimensional activations, but {site} of "
                                 f"{adapter.model_id} has {store.dim(site)}: give the SAE trained at this site of "
                                 "this model")
            acts = clip_features(sae, store, site, reduce="mean").acts
            features, summary = feature_statistics(acts, positive, clips["group"].to_numpy(),
                                                   n_permutations=n_permutations, n_boot=n_boot, alpha=alpha,
                                                   seed=seed)
            best = features["feature"].to_numpy()[:top_k]
            top = top_activating(acts[:, best], clips["clip_id"], n=top_clips)
            top["feature_rank"] = top["feature"].to_numpy()
            top["feature"] = best[top["feature"].to_numpy()]
            top = peak_frames(sae, store, site, top)
    top = top.merge(clips, on="clip_id", how="left")
    top = top[["feature_rank", "feature", "rank", "clip_id", "concept", "group", "activation", "peak_frame",
               "peak_activation", "peak_s", "n_frames", "path"]]
    probe = sparse_probe(acts, positive, groups=clips["group"].to_numpy(), ks=probe_ks(top_k), n_splits=n_splits,
                         seed=seed, n_boot=n_boot)
    return Concept(features, probe, top, clips, acts, {"site": site, **summary})
