"""Cross-corpus transfer on planted corpora with known answers: a concept direction shared by two
corpora transfers (high score, p at its resolution) and a corpus-specific one does not (chance);
corpus normalisation removes a corpus offset that defeats the raw probe; a per-speaker offset hides
the concept from the ordinary sweep unless speakers are normalised (probe.normalise); the axes
across corpora; label alignment; and the stage's tables and figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import re

import pytest
from threadpoolctl import threadpool_limits

from affectlens.probes.axis import auroc
from affectlens.probes.normalise import normalise
from affectlens.probes.sweep import FitSettings, probe_sweep
from affectlens.probes.transfer import (TRANSFER, alignment_rows, axis_transfer_rows, map_labels, shared_labels,
                                        speaker_bootstrap_auroc, transfer_rows, transfer_task, within_rows)
from affectlens.store import write_store

CLASSES = np.array(["angry", "happy", "neutral", "sad"])
FIT = FitSettings(n_boot=200)


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    with threadpool_limits(1):
        yield


def corpus(directions: np.ndarray, seed: int, n_speakers: int = 6, per_class: int = 5, offset: float = 0.0,
           speaker_spread: float = 0.5, noise: float = 1.0):
    """(X [clip, d], labels, speakers): every speaker says every class `per_class` times; a clip is
    its class's direction + the speaker's offset + noise + a corpus `offset` on every feature."""
    rng = np.random.default_rng(seed)
    d = directions.shape[1]
    y = np.tile(np.repeat(np.arange(len(directions)), per_class), n_speakers)
    spk = np.repeat(np.arange(n_speakers), len(directions) * per_class)
    X = (directions[y] + rng.normal(0, speaker_spread, (n_speakers, d))[spk] + rng.normal(0, noise, (len(y), d))
         + offset)
    return X, CLASSES[y], np.array([f"s{seed}_{s}" for s in spk])


def apart(rng, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Class directions of two corpora in disjoint halves of d features: corpus-specific concepts."""
    a, b = np.zeros((4, d)), np.zeros((4, d))
    a[:, : d // 2] = 2.0 * rng.normal(size=(4, d // 2))
    b[:, d // 2:] = 2.0 * rng.normal(size=(4, d // 2))
    return a, b


def _value(rows, metric="accuracy"):
    return next(r for r in rows if r["metric"] == metric)


def test_a_shared_concept_direction_transfers_and_a_corpus_specific_one_does_not():
    rng = np.random.default_rng(0)
    shared = 2.0 * rng.normal(size=(4, 16))
    X_a, y_a, g_a = corpus(shared, seed=1)
    X_b, y_b, g_b = corpus(shared, seed=2)
    task = transfer_task("label", y_a, g_a, y_b, g_b, n_permutations=19, seed=0)
    rows = transfer_rows(X_a, X_b, task, FIT, site="encoder.blocks.0.resid_post")
    acc = _value(rows)
    assert acc["split"] == TRANSFER and acc["n_clips"] == len(y_b) and acc["n_speakers"] == 6
    assert acc["chance"] == pytest.approx(0.25)
    assert acc["value"] > 0.9 and acc["ci_low"] > 0.8
    assert acc["p_value"] == pytest.approx(1 / 20) and acc["p_resolution"] == pytest.approx(1 / 20)
    assert _value(rows, "control_accuracy")["value"] < 0.5  # a probe fit on shuffled labels of A

    mine, own = apart(rng, 16)  # each corpus's classes lie along directions of its own
    X_a, y_a, g_a = corpus(mine, seed=1)
    X_c, y_c, g_c = corpus(own, seed=3)
    rows = transfer_rows(X_a, X_c, transfer_task("label", y_a, g_a, y_c, g_c, n_permutations=19, seed=0), FIT)
    acc = _value(rows)
    assert acc["value"] < 0.5 and acc["ci_low"] <= 0.25 + 0.1 and acc["p_value"] > 0.05
    # ... while each corpus alone holds its concept: the within-corpus sweep finds both
    for X, y, g in ((X_a, y_a, g_a), (X_c, y_c, g_c)):
        within = _value(within_rows(X, y, g, FIT, n_splits=3, n_permutations=9))
        assert within["split"] == "cv" and within["value"] > 0.9 and within["p_value"] == pytest.approx(0.1)


def test_corpus_normalisation_removes_a_corpus_offset_that_defeats_the_raw_probe():
    rng = np.random.default_rng(4)
    shared = 1.5 * rng.normal(size=(4, 12))
    X_a, y_a, g_a = corpus(shared, seed=5)
    X_b, y_b, g_b = corpus(shared, seed=6, offset=8.0 * rng.normal(size=12))  # another room, another microphone
    task = transfer_task("label", y_a, g_a, y_b, g_b, n_permutations=9, seed=0)
    raw = _value(transfer_rows(X_a, X_b, task, FIT), "balanced_accuracy")
    fixed = _value(transfer_rows(normalise(X_a, how="corpus"), normalise(X_b, how="corpus"), task, FIT),
                   "balanced_accuracy")
    assert raw["value"] < 0.5 < 0.9 < fixed["value"]
    # speaker normalisation also removes it (every speaker here says every class)
    by_speaker = _value(transfer_rows(normalise(X_a, g_a, "speaker"), normalise(X_b, g_b, "speaker"), task, FIT),
                        "balanced_accuracy")
    assert by_speaker["value"] > 0.9


def test_normalise_z_scores_per_corpus_and_per_speaker_without_labels():
    rng = np.random.default_rng(0)
    X = rng.normal(3.0, 2.0, (30, 4))
    X[:, 2] = 5.0  # constant: centred, not scaled
    groups = np.repeat(["a", "b", "c"], 10)
    Z = normalise(X, how="corpus")
    assert np.allclose(Z.mean(0), 0) and np.allclose(Z[:, [0, 1, 3]].std(0), 1) and np.allclose(Z[:, 2], 0)
    S = normalise(X, groups, "speaker")
    for g in "abc":
        assert np.allclose(S[groups == g].mean(0), 0) and np.allclose(S[groups == g][:, [0, 1, 3]].std(0), 1)
    assert normalise(X, how="none") is X
    # affine per feature, so the within-corpus sweep (which standardises by each fold's training clips)
    # scores the same: the stage computes it once for none and corpus
    Xc, yc, gc = corpus(np.random.default_rng(1).normal(size=(4, 6)), seed=1, n_speakers=4, per_class=3, offset=5.0)
    plain, scaled = (within_rows(x, yc, gc, FIT, n_splits=4, n_permutations=0) for x in (Xc, normalise(Xc, how="corpus")))
    assert [r["value"] for r in plain] == pytest.approx([r["value"] for r in scaled])
    assert np.allclose(normalise(X[:1], ["x"], "speaker"), 0)  # a lone clip has nothing to be told apart from
    with pytest.raises(ValueError, match="not one of"):
        normalise(X, how="utterance")
    with pytest.raises(ValueError, match="speaker of every clip"):
        normalise(X, how="speaker")


def _store(path, X: np.ndarray, clip_ids, site: str):
    """A store whose pooled matrix at `site` is X (one frame per clip)."""
    with write_store(path, {site: X.shape[1]}, list(clip_ids), {"model_id": "planted", "frame_rate": 50.0},
                     storage_dtype="float32") as w:
        w.append({site: [row[None].astype(np.float32) for row in X]})
    return path


def test_a_per_speaker_offset_hides_the_concept_unless_the_sweep_normalises_speakers(tmp_path):
    """Each speaker's offset lies along the concept direction and is 3x the class gap: a held-out
    speaker's clips all fall on one side of any probe fit on the others, unless each speaker is
    z-scored on their own clips first."""
    rng = np.random.default_rng(7)
    d, n_speakers, per_class = 8, 12, 6
    concept = np.eye(d)[0]
    y = np.tile(np.repeat([0, 1], per_class), n_speakers)
    spk = np.repeat(np.arange(n_speakers), 2 * per_class)
    offsets = 3.0 * np.where(np.arange(n_speakers) % 2, 1.0, -1.0) * (1 + 0.3 * rng.random(n_speakers))
    X = np.outer(y - 0.5 + offsets[spk], concept) + 0.15 * rng.normal(size=(len(y), d))
    site = "encoder.blocks.0.resid_post"
    manifest = pd.DataFrame({"clip_id": [f"c{i:03d}" for i in range(len(y))], "label": np.array(["sad", "happy"])[y],
                             "speaker": [f"spk{s}" for s in spk]})
    store = _store(tmp_path / "s.h5", X, manifest.clip_id, site)
    common = dict(n_splits=4, n_permutations=19, control=False, n_boot=200)
    plain = probe_sweep(store, manifest, **common)
    normed = probe_sweep(store, manifest, normalise="speaker", **common)
    acc = lambda t: t[(t.probe == "label") & (t.metric == "accuracy")].iloc[0]  # noqa: E731
    assert acc(plain).value < 0.65 and acc(plain).p_value > 0.05
    assert acc(normed).value > 0.95 and acc(normed).p_value == pytest.approx(1 / 20)
    with pytest.raises(ValueError, match="probe.normalise"):
        probe_sweep(store, manifest, normalise="corpus", **common)


def test_axes_across_corpora_agree_where_planted_and_not_elsewhere():
    rng = np.random.default_rng(8)
    shared = 2.0 * rng.normal(size=(4, 16))
    X_a, y_a, g_a = corpus(shared, seed=9)
    X_b, y_b, g_b = corpus(shared, seed=10)
    rows = {r["axis"]: r for r in axis_transfer_rows(X_a, y_a, g_a, X_b, y_b, g_b, "sad", "happy", n_boot=200)}
    assert set(rows) == {"per_speaker", "pooled"}
    for r in rows.values():
        assert r["auroc"] > 0.95 and r["ci_low"] > 0.9 and r["cosine"] > 0.9 and r["chance"] == 0.5
        assert r["n_source_clips"] == r["n_target_clips"] == 30 and r["n_speakers"] == 6
    assert rows["per_speaker"]["axis_speakers_a"] == 6 and rows["pooled"]["axis_speakers_a"] == 1
    mine, own = apart(rng, 32)  # B with directions of its own
    X_c, y_c, g_c = corpus(mine, seed=11)
    X_d, y_d, g_d = corpus(own, seed=12)
    r = axis_transfer_rows(X_c, y_c, g_c, X_d, y_d, g_d, "sad", "happy", n_boot=200)[0]
    # near chance: only A's sampling noise in B's features projects B's classes (the interval holds A's axis fixed)
    assert abs(r["cosine"]) < 0.3 and abs(r["auroc"] - 0.5) < 0.25
    # a target corpus whose speakers each say one class: no per-speaker axis of its own, said why
    one = np.where(y_d == "happy", np.char.add(g_d, "_h"), g_d)
    r = axis_transfer_rows(X_c, y_c, g_c, X_d, y_d, one, "sad", "happy", n_boot=50)[0]
    assert np.isnan(r["cosine"]) and "no speaker has clips of both" in r["note"] and np.isfinite(r["auroc"])


def test_speaker_bootstrap_auroc_is_the_mann_whitney_area_with_a_speaker_interval():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=60), 1)  # ties included
    positive = rng.random(60) < 0.5
    groups = np.repeat(np.arange(10), 6)
    value, low, high, method = speaker_bootstrap_auroc(scores, positive, groups, n_boot=300)
    assert value == pytest.approx(auroc(scores[~positive], scores[positive]))
    assert low <= value <= high and method == "bootstrap over speakers"
    assert speaker_bootstrap_auroc(scores, positive, np.zeros(60), n_boot=50)[3] == "bootstrap over clips (a single speaker)"


def test_label_alignment_maps_shares_and_counts_what_is_left_out():
    a = map_labels(["fearful", "happy", "calm", "happy"], {"fearful": "fear"})
    b = map_labels(["fear", "happy", "sad"])
    assert a.tolist() == ["fear", "happy", "calm", "happy"] and shared_labels(a, b) == ["fear", "happy"]
    rows = alignment_rows("rav", ["fearful", "happy", "calm", "happy"], a, ["fear", "happy"])
    assert rows == [{"dataset": "rav", "label": "calm", "mapped_to": "calm", "n_clips": 1, "kept": False},
                    {"dataset": "rav", "label": "fearful", "mapped_to": "fear", "n_clips": 1, "kept": True},
                    {"dataset": "rav", "label": "happy", "mapped_to": "happy", "n_clips": 2, "kept": True}]
    with pytest.raises(ValueError, match="two shared classes"):
        transfer_task("label", ["a", "b"], ["x", "y"], ["a", "c"], ["z", "w"])


def test_the_stage_writes_every_table_and_figure_with_the_acoustic_baseline_transferred(tmp_path):
    """stages.transfer.transfer, as rule transfer calls it, on two planted corpora: a site where both
    corpora share the concept transfers, a site where each has its own does not, the acoustic tables
    are transferred as the pseudo-site, labels outside the shared set are left out and counted."""
    from affectlens.data.manifest import MANIFEST_COLUMNS, write_manifest
    from affectlens.stages.transfer import read_corpus, run_transfer, transfer

    rng = np.random.default_rng(13)
    shared = 2.0 * rng.normal(size=(4, 16))
    mine, own = apart(rng, 16)
    sites = {"encoder.blocks.0.resid_post": (mine, own), "encoder.blocks.1.resid_post": (shared, shared)}
    paths = {}
    for k, name in enumerate(("a", "b")):
        acts = {s: corpus(dirs[k], seed=20 + k, n_speakers=4, per_class=4) for s, dirs in sites.items()}
        X0, y, g = next(iter(acts.values()))
        y = y.copy()
        if name == "b":
            y[y == "neutral"] = "calm"  # b says calm where a says neutral: left out, not mapped
        ids = [f"{name}{i:03d}" for i in range(len(y))]
        manifest = pd.DataFrame({c: np.nan for c in MANIFEST_COLUMNS}, index=range(len(y)))
        manifest = manifest.assign(clip_id=ids, dataset=name, path=[f"/x/{i}.flac" for i in ids], split="", label=y,
                                   speaker=g)
        write_manifest(manifest, tmp_path / f"{name}.tsv")
        with write_store(tmp_path / f"{name}.h5", {s: 16 for s in sites}, ids, {"model_id": "planted"},
                         storage_dtype="float32") as w:
            w.append({s: [row[None].astype(np.float32) for row in acts[s][0]] for s in sites})
        acoustic = pd.DataFrame(acts["encoder.blocks.1.resid_post"][0][:, :6] + rng.normal(0, 2, (len(y), 6)),
                                columns=[f"f{j}" for j in range(6)])
        acoustic.insert(0, "clip_id", ids)
        acoustic.to_csv(tmp_path / f"{name}.acoustic.tsv", sep="\t", index=False)
        paths[name] = (tmp_path / f"{name}.h5", tmp_path / f"{name}.tsv", tmp_path / f"{name}.acoustic.tsv")
    outputs = {k: tmp_path / "out" / f for k, f in [("table", "transfer.tsv"), ("axes", "axes.tsv"),
                                                      ("labels", "labels.tsv"), ("plot", "transfer.png"),
                                                      ("axes_plot", "axes.png")]}
    datasets = [{"name": n, "label_column": "label", "label_map": {}} for n in paths]
    transfer(datasets, [p[0] for p in paths.values()], [p[1] for p in paths.values()], [p[2] for p in paths.values()],
             {"n_permutations": 9, "n_boot": 100, "n_splits": 4}, {"normalise": ["none", "corpus"]},
             [{"source": "sad", "target": "happy"}, {"source": "neutral", "target": "angry"}], outputs)
    table = pd.read_csv(outputs["table"], sep="\t")
    acc = table[(table.metric == "accuracy") & (table.scope == "transfer")].set_index(["source", "site", "normalise"])
    assert set(table.site) == {"acoustic.mfcc_stats", *sites} and set(table.classes) == {"angry;happy;sad"}
    for source in "ab":
        for how in ("none", "corpus"):
            assert acc.loc[(source, "encoder.blocks.1.resid_post", how)].value > 0.9
            assert acc.loc[(source, "encoder.blocks.1.resid_post", how)].p_value == pytest.approx(0.1)
            assert acc.loc[(source, "encoder.blocks.0.resid_post", how)].value < 0.6
            assert acc.loc[(source, "acoustic.mfcc_stats", how)].n_clips == 48
    within = table[(table.metric == "accuracy") & (table.scope == "within_target")]
    assert (within[within.site == "encoder.blocks.0.resid_post"].value > 0.9).all()  # each corpus has its concept
    labels = pd.read_csv(outputs["labels"], sep="\t").set_index(["source", "dataset", "label"])
    assert not labels.loc[("a", "a", "neutral")].kept and labels.loc[("a", "b", "calm")].n_clips == 16
    axes = pd.read_csv(outputs["axes"], sep="\t")
    assert set(axes.contrast) == {"sad-to-happy"}  # neutral is not shared: that contrast is skipped
    shared_axis = axes[(axes.site == "encoder.blocks.1.resid_post") & (axes.axis == "per_speaker")]
    assert (shared_axis.auroc > 0.95).all() and (shared_axis.cosine > 0.9).all()
    for key in ("plot", "axes_plot"):
        assert outputs[key].read_bytes()[:4] == b"\x89PNG"
    # sites fit in two worker threads give the serial tables
    corpora = [read_corpus(n, *paths[n][:2], acoustic_path=paths[n][2]) for n in paths]
    parallel, _, _ = run_transfer(corpora, {"n_permutations": 9, "n_boot": 100, "n_splits": 4},
                                  {"normalise": ["none", "corpus"]}, threads=2)
    pd.testing.assert_frame_equal(parallel.drop(columns="classes"), table.drop(columns="classes"), check_dtype=False)


def test_the_ui_lists_a_studys_transfer_figures(tmp_path):
    from affectlens.ui.index import index_results

    root = tmp_path / "results"
    for rel in ["transfer/pair/tiny/transfer.tsv", "transfer/pair/tiny/axes.tsv", "transfer/pair/tiny/transfer.png",
                "transfer/pair/tiny/axes.png", "transfer/pair/other/axes.png", "probe/a/tiny/sweep.tsv"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    idx = index_results(root)
    assert idx["transfer"] == {"pair": [{"model": "tiny", "table": "transfer/pair/tiny/transfer.tsv",
                                         "axes": "transfer/pair/tiny/axes.tsv",
                                         "figures": [{"name": "axes", "path": "transfer/pair/tiny/axes.png"},
                                                     {"name": "transfer", "path": "transfer/pair/tiny/transfer.png"}]}]}
    assert "pair" in idx["studies"]  # offered in the study picker even without heatmaps
    pytest.importorskip("dash")
    from affectlens.ui.app import transfer_section

    page = str(transfer_section(idx["transfer"]["pair"]))
    assert "/files/transfer/pair/tiny/transfer.png" in page and "/files/transfer/pair/tiny/axes.tsv" in page
    assert "No transfer results" in str(transfer_section([]))


def _two_demo_datasets() -> dict:
    return {"datasets": {n: {"source": "demo", "demo": {"emotions": ["neutral", "happy", "sad"]}} for n in "ab"},
            "models": {"m": {"family": "whisper", "source": "x", "sites": ["encoder.embed"]}},
            "studies": {"s": {"datasets": ["a", "b"], "models": ["m"],
                              "contrasts": [{"source": "sad", "target": "happy"}]}}}


def test_config_checks_label_maps_against_the_datasets_labels():
    from affectlens.config import ConfigError, check_config

    cfg = _two_demo_datasets()
    check_config(cfg)  # as given: fine
    cfg["datasets"]["a"]["label_map"] = {"furious": "mad"}
    with pytest.raises(ConfigError, match=r"datasets\.a\.label_map renames 'furious', which dataset 'a' does not"):
        check_config(cfg)


@pytest.mark.parametrize("change, why", [
    ({}, ""),
    ({"b": {"demo": {"emotions": ["happy", "calm"]}}, "contrasts": []},
     r"datasets 'a' and 'b' share \['happy'\] label\(s\) after their label_map"),
    ({"a": {"label_map": {"sad": "low"}}}, r"share \['happy', 'neutral'\] label\(s\) .*contrasts need \['happy', 'sad'\]"),
])
def test_a_study_transfers_only_where_its_datasets_share_the_labels(change, why):
    """A study of several datasets that do not share two labels (or its contrasts' labels) after
    their label_map is still a valid study (probes, patching, steering per dataset); only the
    transfer stage leaves it out, saying why."""
    from affectlens.config import check_config, transfer_studies

    cfg = _two_demo_datasets()
    for key, value in change.items():
        if key == "contrasts":
            cfg["studies"]["s"]["contrasts"] = value
        else:
            cfg["datasets"][key].update(value)
    check_config(cfg)
    reason = transfer_studies(cfg)["s"]
    assert reason == "" if not why else re.search(why, reason), reason
