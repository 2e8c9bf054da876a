"""The real Snakemake DAG of the transfer stage on a tiny study of two small espeak corpora (other
speakers, partly other emotions, one label renamed by label_map) through a tiny random-init Whisper
(test_workflow's): label alignment, every site x pair x normalisation x scope in the table, the
axes, the figures."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from test_workflow import snakemake, tiny_whisper

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

PAIR = {
    "datasets": {
        "a": {"source": "demo", "label_map": {"angry": "mad"},
              "demo": {"speakers": ["en-us+m3", "en-us+f2"], "n_sentences": 2,
                       "emotions": ["neutral", "happy", "sad", "angry"]}},
        "b": {"source": "demo", "label_map": {"angry": "mad"},
              "demo": {"speakers": ["en-us+m7", "en-us+f4"], "n_sentences": 2, "seed": 1,
                       "emotions": ["happy", "sad", "angry", "fearful"]}},
    },
    "models": {"tiny": {"family": "whisper", "source": None, "sites": ["encoder.embed", "encoder.blocks.*.resid_post"],
                        "batch_size": 8}},
    "studies": {"pair": {"datasets": ["a", "b"], "models": ["tiny"], "contrasts": [{"source": "sad", "target": "happy"}]}},
    # the acoustic baseline's transfer is tested on planted stores (test_transfer.py): its job costs a minute here
    "probe": {"n_permutations": 9, "n_boot": 50, "acoustic_baseline": False},
    "transfer": {"normalise": ["none", "speaker"]},
}
OUT = "results/transfer/pair/tiny"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("transfer")
    cfg = json.loads(json.dumps(PAIR))
    cfg["models"]["tiny"]["source"] = str(tiny_whisper(work / "tiny-whisper"))
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    result = snakemake(work, f"{OUT}/transfer.tsv")
    assert result.returncode == 0, result.stderr[-4000:]
    return work


def test_labels_are_aligned_through_the_label_map_and_the_left_out_clips_counted(run):
    labels = pd.read_csv(run / OUT / "labels.tsv", sep="\t")
    a_to_b = labels[(labels.source == "a") & (labels.target == "b")].set_index(["dataset", "label"])
    assert a_to_b.loc[("a", "angry")].mapped_to == "mad" and bool(a_to_b.loc[("a", "angry")].kept)
    assert not a_to_b.loc[("a", "neutral")].kept and a_to_b.loc[("a", "neutral")].n_clips == 4
    assert not a_to_b.loc[("b", "fearful")].kept and a_to_b.loc[("b", "fearful")].n_clips == 4
    assert set(labels[["source", "target"]].itertuples(index=False)) == {("a", "b"), ("b", "a")}
    assert "left out: neutral (4)" in (run / "logs/transfer/pair/tiny.log").read_text()


def test_every_site_pair_normalisation_and_scope_is_in_the_table(run):
    table = pd.read_csv(run / OUT / "transfer.tsv", sep="\t")
    sites = {"encoder.embed", "encoder.blocks.0.resid_post", "encoder.blocks.1.resid_post"}
    assert set(table.site) == sites and set(table.normalise) == {"none", "speaker"}
    acc = table[table.metric == "balanced_accuracy"]
    assert len(acc) == len(sites) * 2 * 2 * 3  # sites x normalisations x ordered pairs x scopes
    assert (acc.classes == "happy;mad;sad").all()
    transfer = acc[acc.scope == "transfer"]
    # fit on all 12 aligned clips of one corpus, scored on all 12 of the other (2 speakers x 3 classes x 2)
    assert (transfer.split == "transfer").all() and (transfer.n_clips == 12).all() and (transfer.n_speakers == 2).all()
    assert np.allclose(transfer.chance, 1 / 3) and np.allclose(transfer.p_resolution, 0.1)
    assert transfer.p_value.between(0.1, 1).all() and transfer.value.between(0, 1).all()
    assert (transfer.dataset == transfer.target).all()
    within = acc[acc.scope == "within_source"]
    assert (within.split == "cv").all() and (within.dataset == within.source).all() and (within.n_clips == 12).all()
    # the same corpus's within-corpus rows are the same, whichever pair lists them
    a_src = within[within.source == "a"].set_index(["site", "normalise"]).value
    a_tgt = acc[(acc.scope == "within_target") & (acc.target == "a")].set_index(["site", "normalise"]).value
    assert a_src.sort_index().tolist() == a_tgt.sort_index().tolist()


def test_axes_and_figures(run):
    axes = pd.read_csv(run / OUT / "axes.tsv", sep="\t")
    assert set(axes.contrast) == {"sad-to-happy"} and set(axes.axis) == {"per_speaker", "pooled"}
    assert len(axes) == 3 * 2 * 2 * 2  # sites x normalisations x pairs x axis kinds
    assert axes.auroc.between(0, 1).all() and axes.cosine.between(-1, 1).all()
    assert (axes.n_source_clips == 4).all() and (axes.axis_speakers_a[axes.axis == "per_speaker"] == 2).all()
    for png in ("transfer.png", "axes.png"):
        assert (run / OUT / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
