"""Time-resolved regression probes of dynamic valence/arousal ratings (affectlens.probes.dynamic):
a planted store where one site carries the rating of every window along known directions and
another carries nothing; the ratings tables PMEmo and DEAM give; and the real DAG on a tiny PMEmo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from dataset_fixtures import build_deam, build_pmemo, write_mp3
from threadpoolctl import threadpool_limits

from affectlens.probes.dynamic import (
    ACOUSTIC_BIN_FEATURES,
    acoustic_bins,
    curve_permutations,
    dynamic_probe,
    pool_bins,
    rating_bins,
)
from affectlens.probes.regression import regression_metrics
from affectlens.probes.sweep import grouped_splits
from affectlens.store import Store, write_store

FRAME_RATE = 50.0
PLANTED, EMPTY = "encoder.blocks.1.resid_post", "encoder.blocks.0.resid_post"


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    with threadpool_limits(1):  # tiny matrices: threads only fight over the cores
        yield


def _curves(rng, n_songs, n_ratings):
    """Slow random-walk valence/arousal curves in [0, 1], one per song (2 Hz)."""
    walk = np.cumsum(rng.normal(0, 0.08, (n_songs, n_ratings, 2)), axis=1) + rng.uniform(0.2, 0.8, (n_songs, 1, 2))
    return np.clip(walk, 0, 1)


def planted_store(tmp_path, n_songs=24, n_ratings=12, first_s=2.0, d=8, seed=0):
    """Songs of 12 artists (2 each), one clip per song, rated at 2 Hz from `first_s`. At PLANTED every
    frame of the window [t, t + 0.5) is 3 valence(t) u + 3 arousal(t) v + a song offset + noise;
    at EMPTY the same without the ratings. Returns (store path, ratings, speaker per clip, u, v)."""
    rng = np.random.default_rng(seed)
    curves = _curves(rng, n_songs, n_ratings)
    u, v = np.eye(d)[0], np.eye(d)[3]
    per_bin = int(0.5 * FRAME_RATE)
    lead = int(first_s * FRAME_RATE)
    clip_ids = [f"pmemo_{s}" for s in range(n_songs)]
    frames = {PLANTED: [], EMPTY: []}
    rows = []
    for s in range(n_songs):
        n = lead + n_ratings * per_bin + 7  # a few frames past the last window
        offset = rng.normal(0, 1.0, d) * (1 - u - v)  # a song's own colour, off the rating directions
        signal = np.zeros((n, d))
        for k in range(n_ratings):
            sl = slice(lead + k * per_bin, lead + (k + 1) * per_bin)
            signal[sl] = curves[s, k, 0] * 3 * u + curves[s, k, 1] * 3 * v
            rows.append({"clip_id": clip_ids[s], "song": str(s), "time_s": first_s + 0.5 * k,
                         "valence": curves[s, k, 0], "arousal": curves[s, k, 1], "scale": "[0, 1]"})
        frames[PLANTED].append(offset + signal + rng.normal(0, 0.3, (n, d)))
        frames[EMPTY].append(offset + rng.normal(0, 0.3, (n, d)))
    path = tmp_path / "planted.h5"
    with write_store(path, {PLANTED: d, EMPTY: d}, clip_ids, {"model_id": "planted", "frame_rate": FRAME_RATE},
                     storage_dtype="float32") as w:
        w.append({site: [f.astype(np.float32) for f in fs] for site, fs in frames.items()})
    speakers = pd.Series([f"artist_{s // 2}" for s in range(n_songs)], index=clip_ids)
    return path, pd.DataFrame(rows), speakers, u, v


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_store(tmp_path_factory.mktemp("dyn"))


def _bins(planted, **kw):
    path, ratings, speakers, _, _ = planted
    with Store(path) as st:
        return rating_bins(ratings, st.clip_ids, st.n_frames_of(PLANTED), FRAME_RATE, speakers, **kw)


# --- windows and pooling -----------------------------------------------------------------------------

def test_windows_start_at_the_rating_time_and_lag_moves_them_earlier(planted):
    _, ratings, *_ = planted
    bins = _bins(planted)
    first = bins.table[bins.table["clip_id"] == "pmemo_0"]
    assert first["first"].tolist()[:3] == [100, 125, 150] and first["stop"].tolist()[:3] == [125, 150, 175]
    lagged = _bins(planted, lag_s=2.5)  # the first rating (t = 2.0 s) would need audio before the clip: dropped
    assert len(lagged) == len(ratings) - 24
    assert lagged.table[lagged.table["clip_id"] == "pmemo_0"]["first"].tolist()[:2] == [0, 25]


def test_pooled_windows_are_the_mean_of_their_frames(planted):
    path, *_ = planted
    bins = _bins(planted)
    with Store(path) as st:
        pooled = pool_bins(st.frame_chunks(PLANTED, chunk_rows=97), st.offsets_of(PLANTED), bins)  # chunks cut windows
        t = bins.table
        for i in (0, 13, len(t) - 1):
            frames = st.clip_frames(PLANTED, int(t["row"][i]))[t["first"][i]:t["stop"][i]]
            np.testing.assert_allclose(pooled[i], frames.mean(0), rtol=1e-6, atol=1e-6)


def test_song_folds_never_split_a_group(planted):
    bins = _bins(planted)
    groups = bins.table["group"].to_numpy()
    for tr, te in grouped_splits(None, groups, 5, seed=3, unit="songs"):
        assert not set(groups[tr]) & set(groups[te])


def test_permutations_move_whole_curves_between_songs(planted):
    bins = _bins(planted)
    t = bins.table
    perm = curve_permutations(bins, 20, seed=1)
    songs = t["song"].to_numpy()
    moved = 0
    for p in perm:
        donors = {}
        for song in np.unique(songs):
            own = np.flatnonzero(songs == song)  # table is sorted by clip row, then time
            donor = np.unique(songs[p[own]])
            assert len(donor) == 1  # one song's curve ...
            assert np.array_equal(p[own], np.flatnonzero(songs == donor[0]))  # ... whole, in time order
            donors[song] = donor[0]
        assert sorted(donors.values()) == sorted(donors)  # each curve given out once
        moved += sum(a != b for a, b in donors.items())
    assert moved > 0.8 * 20 * 24


def test_a_shorter_donor_curve_is_mirrored(planted):
    _, ratings, speakers, _, _ = planted
    short = ratings[~((ratings["song"] == "0") & (ratings["time_s"] > 3.0))]  # song 0: 3 ratings, the others 12
    path = planted[0]
    with Store(path) as st:
        bins = rating_bins(short, st.clip_ids, st.n_frames_of(PLANTED), FRAME_RATE, speakers)
    songs = bins.table["song"].to_numpy()
    zero = np.flatnonzero(songs == "0")
    perm = curve_permutations(bins, 60, seed=0)
    hits = [p for p in perm if songs[p[np.flatnonzero(songs == "5")][0]] == "0"]
    assert hits
    assert hits[0][np.flatnonzero(songs == "5")].tolist() == [zero[i] for i in (0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1)]


# --- the known answer -----------------------------------------------------------------------------

def test_planted_site_carries_both_ratings_the_empty_site_none(planted):
    path, *_ = planted
    bins = _bins(planted)
    with Store(path) as st:
        table, preds = dynamic_probe(lambda s: pool_bins(st.frame_chunks(s), st.offsets_of(s), bins), [EMPTY, PLANTED],
                                     bins, n_splits=4, n_permutations=19, seed=0)
    v = table.set_index(["site", "target", "metric"])
    for target in ("valence", "arousal"):
        assert v.loc[(PLANTED, target, "r2"), "value"] > 0.9
        assert v.loc[(PLANTED, target, "ccc"), "value"] > 0.9
        assert v.loc[(PLANTED, target, "pearson"), "ci_low"] > 0.9
        assert v.loc[(PLANTED, target, "r2"), "p_value"] == pytest.approx(0.05)  # its resolution, 1 / (1 + 19)
        assert v.loc[(EMPTY, target, "r2"), "value"] < 0.05
        # pooled out-of-fold scores of a site without signal sit at or below 0 (each test fold is
        # predicted from the other folds' mean), and so do the permuted ones: p stays large
        assert v.loc[(EMPTY, target, "ccc"), "value"] < 0.2
        assert all(v.loc[(EMPTY, target, m), "p_value"] > 0.05 for m in ("r2", "ccc", "pearson"))
        # value: the metrics of the pooled out-of-fold predictions; fold_mean: the per-fold mean
        here = preds[preds["site"] == PLANTED]
        pooled = regression_metrics(here[target].to_numpy(), here[f"predicted_{target}"].to_numpy())
        for m in ("r2", "ccc", "pearson"):
            assert v.loc[(PLANTED, target, m), "value"] == pytest.approx(float(pooled[m]), abs=1e-12)
            assert v.loc[(PLANTED, target, m), "ci_low"] <= v.loc[(PLANTED, target, m), "value"] \
                <= v.loc[(PLANTED, target, m), "ci_high"]
        assert v.loc[(PLANTED, target, "r2"), "fold_mean"] != v.loc[(PLANTED, target, "r2"), "value"]
    assert (table["ci_method"] == "bootstrap over groups").all()
    assert (table["p_resolution"] == 0.05).all() and (table["n_songs"] == 24).all() and (table["n_groups"] == 12).all()
    # out-of-fold predictions follow the rated curve at the planted site only
    here = preds[preds["site"] == PLANTED]
    assert np.corrcoef(here["valence"], here["predicted_valence"])[0, 1] > 0.95


def test_acoustic_windows_hear_a_planted_loudness_curve():
    sr = 16000
    level = np.repeat([0.02, 0.3, 0.05, 0.2, 0.1, 0.4], sr // 2)  # one level per 0.5 s
    wave = (level * np.sin(2 * np.pi * 440 * np.arange(len(level)) / sr)).astype(np.float32)
    ratings = pd.DataFrame({"clip_id": "c", "song": "s", "time_s": 0.5 * np.arange(6), "valence": 0.0,
                            "arousal": 0.0})
    bins = rating_bins(ratings, ["c"], np.array([300]), 50.0, pd.Series(["g"], index=["c"]))
    X = acoustic_bins({0: wave}, sr, bins)
    rms = X[:, ACOUSTIC_BIN_FEATURES.index("rms_db_mean")]
    assert np.argsort(rms).tolist() == np.argsort(level[::sr // 2]).tolist()
    np.testing.assert_allclose(np.diff(rms), 20 * np.diff(np.log10(level[::sr // 2])), atol=1.5)
    centroid = X[:, ACOUSTIC_BIN_FEATURES.index("centroid_hz")]
    assert np.all(np.abs(centroid - 440) < 120)


def test_ratings_of_clips_outside_the_store_are_left_out_and_errors_name_the_fix(planted):
    path, ratings, speakers, _, _ = planted
    extra = pd.concat([ratings, ratings.head(3).assign(clip_id="pmemo_999")], ignore_index=True)
    with Store(path) as st:
        bins = rating_bins(extra, st.clip_ids, st.n_frames_of(PLANTED), FRAME_RATE, speakers)
        assert len(bins) == len(ratings)
        with pytest.raises(ValueError, match="same dataset's manifest"):
            rating_bins(ratings.assign(clip_id="other"), st.clip_ids, st.n_frames_of(PLANTED), FRAME_RATE, speakers)
        with pytest.raises(ValueError, match="several CV groups"):
            rating_bins(ratings.assign(song="one"), st.clip_ids, st.n_frames_of(PLANTED), FRAME_RATE, speakers)


# --- ratings tables from the datasets ------------------------------------------------------------

def _songs(n_dynamic=8):
    return {1: {"artist": "A", "seconds": 1.0, "valence": 0.8, "arousal": 0.7,
                "dynamic": [(0.1 * k, 0.9 - 0.1 * k) for k in range(n_dynamic)]},
            2: {"artist": "B", "seconds": 1.0, "valence": 0.2, "arousal": 0.3,
                "dynamic": [(0.5, 0.5)] * n_dynamic}}


def test_pmemo_ratings_whole_choruses_and_rebased_segments(tmp_path):
    from affectlens.data import pmemo

    build_pmemo(tmp_path / "raw", _songs())
    m, _ = pmemo.build_manifest(tmp_path / "raw", "pmemo", pmemo.Options())
    table, missing = pmemo.read_ratings(tmp_path / "raw", m)
    one = table[table["clip_id"] == "pmemo_1"]
    assert not missing and one["time_s"].tolist() == [15.0 + 0.5 * k for k in range(8)]  # chorus start = clip start
    assert one["arousal"].tolist() == pytest.approx([0.1 * k for k in range(8)]) and set(table["scale"]) == {"[0, 1]"}
    seg, _ = pmemo.build_manifest(tmp_path / "raw", "pmemo", pmemo.Options(segment_s=2.0))
    table, _ = pmemo.read_ratings(tmp_path / "raw", seg)
    second = table[table["clip_id"] == "pmemo_1_017000ms"]
    assert second["time_s"].tolist() == [0.0, 0.5, 1.0, 1.5]  # 17.0 ... 18.5 s of the chorus, re-based
    assert second["valence"].tolist() == pytest.approx([0.5, 0.4, 0.3, 0.2]) and set(second["song"]) == {"1"}


def test_deam_ratings_on_the_dynamic_scale(tmp_path):
    from affectlens.data import deam

    songs = {10: {"seconds": 1.0, "valence": 6.0, "arousal": 3.0, "dynamic": [(-0.2, 0.4), (-0.1, 0.5)]},
             20: {"seconds": 1.0, "valence": 4.0, "arousal": 7.0, "dynamic": [(0.3, -0.6)]}}
    build_deam(tmp_path / "raw", songs)
    m, _ = deam.build_manifest(tmp_path / "raw", "deam", deam.Options())
    table, missing = deam.read_ratings(tmp_path / "raw", m)
    assert not missing and set(table["scale"]) == {"[-1, 1]"}
    ten = table[table["clip_id"] == "deam_10"]
    assert ten["time_s"].tolist() == [15.0, 15.5] and ten["valence"].tolist() == [0.4, 0.5]
    assert ten["arousal"].tolist() == [-0.2, -0.1]
    assert table[table["clip_id"] == "deam_20"]["time_s"].tolist() == [15.0]


# --- the real DAG on a tiny PMEmo ------------------------------------------------------------------

def _tiny_pmemo(root: Path, n_songs: int = 6, n_ratings: int = 6, seed: int = 0) -> Path:
    """PMEmo2019/ as published: choruses of 15 s + n_ratings / 2 s whose loudness in each rated
    half second follows that rating's arousal (-34 dB + 24 dB x arousal), valence unrelated to the audio."""
    rng = np.random.default_rng(seed)
    curves = _curves(rng, n_songs, n_ratings)
    songs = {mid: {"artist": f"Artist {mid}", "seconds": 15 + 0.5 * n_ratings, "valence": 0.5, "arousal": 0.5,
                   "dynamic": [(round(a, 3), round(v, 3)) for v, a in curves[mid - 1]], "audio": False}
             for mid in range(1, n_songs + 1)}
    base = build_pmemo(root, songs)
    sr = 22050
    for mid, s in songs.items():
        level_db = np.concatenate([np.full(15 * sr, -20.0)]
                                  + [np.full(sr // 2, -34 + 24 * a) for a, _ in s["dynamic"]])
        t = np.arange(len(level_db)) / sr
        x = 10 ** (level_db / 20) * np.sin(2 * np.pi * (220 + 20 * mid) * t)
        write_mp3(base / "chorus" / f"{mid}.mp3", x.astype(np.float32), sr)
    return root


@pytest.mark.workflow
@pytest.mark.slow
def test_workflow_probe_dynamic_on_a_tiny_pmemo(tmp_path):
    from test_workflow import snakemake, tiny_whisper

    _tiny_pmemo(tmp_path / "pmemo")
    cfg = {"datasets": {"pm": {"source": "pmemo", "pmemo": {"root": str(tmp_path / "pmemo" / "PMEmo2019")}},
                        "speech": {"source": "demo"}},
           "models": {"tiny": {"family": "whisper", "source": str(tiny_whisper(tmp_path / "tiny-whisper")),
                               "sites": ["encoder.embed", "encoder.blocks.*.resid_post"], "batch_size": 6}},
           "studies": {"music": {"datasets": ["pm", "speech"], "models": ["tiny"]}},
           "probe_dynamic": {"n_permutations": 19, "n_splits": 2}}  # 3 songs per test fold
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    planned = snakemake(tmp_path, "-n", "--quiet", "rules")
    assert planned.returncode == 0, planned.stderr[-3000:]
    counts = dict(line.split()[:2] for line in (planned.stdout + planned.stderr).splitlines()
                  if len(line.split()) == 2 and line.split()[1].isdigit())
    assert counts["probe_dynamic"] == "1" and counts["dynamic_ratings"] == "1"  # `all` asks for PMEmo's only
    assert counts["probe"] == "2"
    run = snakemake(tmp_path, "results/probe_dynamic/pm/tiny/sweep.tsv")
    assert run.returncode == 0, run.stderr[-4000:]

    ratings = pd.read_csv(tmp_path / "results/dynamic_ratings/pm.tsv", sep="\t", dtype={"clip_id": str, "song": str})
    assert len(ratings) == 6 * 6 and set(ratings["scale"]) == {"[0, 1]"}
    assert ratings[ratings["clip_id"] == "pmemo_1"]["time_s"].tolist() == [15.0, 15.5, 16.0, 16.5, 17.0, 17.5]
    table = pd.read_csv(tmp_path / "results/probe_dynamic/pm/tiny/sweep.tsv", sep="\t")
    sites = {"acoustic.frame_stats", "encoder.embed", "encoder.blocks.0.resid_post", "encoder.blocks.1.resid_post"}
    assert set(table["site"]) == sites and len(table) == len(sites) * 2 * 3
    assert (table["n_bins"] == 36).all() and (table["n_songs"] == 6).all() and (table["n_folds"] == 2).all()
    assert (table["p_resolution"] == 0.05).all()
    assert np.isfinite(table["value"]).all() and table["p_value"].between(0.05, 1.0).all()
    v = table.set_index(["site", "target", "metric"])
    # loudness follows arousal: the baseline finds it (3 training songs per fold, 22 features: R² 0.59)
    assert v.loc[("acoustic.frame_stats", "arousal", "r2"), "value"] > 0.4
    assert v.loc[("acoustic.frame_stats", "arousal", "ccc"), "value"] > 0.5
    assert v.loc[("acoustic.frame_stats", "arousal", "r2"), "p_value"] == pytest.approx(0.05)
    assert v.loc[("acoustic.frame_stats", "valence", "r2"), "value"] < 0.0  # valence is not in the audio
    assert (table["ci_high"] <= 1.0).all()
    predictions = pd.read_csv(tmp_path / "results/probe_dynamic/pm/tiny/predictions.tsv", sep="\t")
    assert len(predictions) == 36 * len(sites) and predictions["predicted_arousal"].notna().all()
    assert (tmp_path / "results/probe_dynamic/pm/tiny/dynamic.png").stat().st_size > 10000


def test_dynamic_ratings_of_a_source_without_them_is_an_error_naming_the_dataset(tmp_path):
    from affectlens import stages

    with pytest.raises(ValueError, match=r"dataset 'speech' \(source ravdess\) has no dynamic ratings"):
        stages.data.dynamic_ratings(tmp_path, tmp_path / "m.tsv", "speech", {"source": "ravdess"}, tmp_path / "out.tsv")
