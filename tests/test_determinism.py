"""Determinism: the same config and seed give the same results, file for file, across two separate
runs (fresh interpreters with different hash seeds, so nothing may hang on set or dict order of
strings): manifests and rejections, decoded audio, the activation store (bitwise, float32 on the
CPU), probe tables, SAE weights and metrics, patching tables.

Each run is every stage function of the workflow in order (raw → manifest → decode → extract →
probe → sae → patch), on a synthetic corpus that a user would bring as a folder with a labels
CSV, and a tiny wav2vec2 in a local folder (bench/bench_scale.py builds both)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from affectlens.store import Store

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

PIPELINE = """
import json, sys
from pathlib import Path
import pandas as pd
import torch
torch.set_num_threads(1)
sys.path.insert(0, {bench!r})
import bench_scale
from affectlens import stages

corpus = bench_scale.make_corpus(Path("corpus"), n_speakers=3, n_sentences=2)
table = pd.read_csv(corpus, sep="\\t")
table.assign(path=[Path(p).name for p in table.path])[["path", "label", "speaker", "pair_key"]].to_csv(
    "labels.csv", index=False)
# one clip the manifest stage must reject, the same way both times
(Path("corpus/audio") / "broken.flac").write_bytes(b"not audio")
with open("labels.csv", "a") as f:
    f.write("broken.flac,sad,spk999,\\n")
cfg = bench_scale.workflow_config({model!r})
cfg["datasets"]["synth"]["folder"] = {{"root": "corpus/audio", "csv": "labels.csv"}}
from snakemake.utils import validate
validate(cfg, {schema!r})
d, m = cfg["datasets"]["synth"], cfg["models"]["tiny"]
stages.data.raw("synth", d, Path("resources/raw/synth"))
stages.data.manifest(Path("resources/raw/synth"), "synth", d, Path("results/manifest/synth.tsv"),
                Path("results/manifest/synth.rejected.tsv"))
stages.data.decode(Path("results/manifest/synth.tsv"), d, Path("results/decode/synth/audio"),
              Path("results/decode/synth/frames"), Path("results/decode/synth/manifest.tsv"),
              Path("results/decode/synth/rejected.tsv"))
manifest, store = Path("results/decode/synth/manifest.tsv"), Path("results/extract/synth/tiny.h5")
stages.extract.extract(manifest, m, store)
out = Path("results/probe")
stages.probe.probe(store, manifest, cfg["probe"], "label", out / "sweep.tsv", out / "confusion.tsv", out / "curve.png",
             readout_site=m["readout_site"], out_folds=out / "folds.tsv")
stages.sae.sae(store, manifest, bench_scale.SAE_SITE, cfg["sae"], "label", Path("results/sae"),
           checkpoint=Path("results/sae.ck.pt"))
out = Path("results/patch")
stages.patch.patch(store, manifest, m, {{"source": "sad", "target": "happy"}}, cfg["patch"], "label", out / "pairs.tsv",
             out / "effects.tsv", out / "summary.tsv", out / "agreement.tsv")
"""

SAME_BYTES = ["results/manifest/synth.tsv", "results/manifest/synth.rejected.tsv", "results/decode/synth/manifest.tsv",
              "results/decode/synth/rejected.tsv", "results/probe/sweep.tsv", "results/probe/confusion.tsv",
              "results/probe/folds.tsv", "results/sae/sae.safetensors", "results/sae/cfg.json",
              "results/sae/features.tsv", "results/sae/top_clips.tsv", "results/sae/sparse_probe.tsv",
              "results/patch/pairs.tsv", "results/patch/effects.tsv", "results/patch/summary.tsv",
              "results/patch/agreement.tsv"]
TIMINGS = {"seconds", "samples_per_second"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    sys.path.insert(0, str(REPO / "bench"))
    import bench_scale

    base = tmp_path_factory.mktemp("det")
    model = bench_scale.make_model(base / "model")
    script = PIPELINE.format(bench=str(REPO / "bench"), model=str(model),
                             schema=str(REPO / "workflow/schemas/config.schema.yaml"))
    works = []
    for i, hash_seed in enumerate(("1", "2")):
        work = base / f"run{i}"
        work.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, out.stderr[-4000:]
        works.append(work)
    return works


def test_manifests_rejections_and_decoded_audio_are_identical(runs):
    a, b = runs
    rejected = pd.read_csv(a / "results/manifest/synth.rejected.tsv", sep="\t")
    assert rejected["clip_id"].tolist() == ["broken"] and "not decodable" in rejected["reason"][0]
    assert len(pd.read_csv(a / "results/decode/synth/manifest.tsv", sep="\t")) == 12
    flacs = sorted(p.relative_to(a) for p in (a / "results/decode/synth/audio").iterdir())
    assert len(flacs) == 12
    for rel in [*SAME_BYTES[:4], *flacs]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_stores_are_bitwise_identical(runs):
    a, b = (Store(w / "results/extract/synth/tiny.h5") for w in runs)
    with a, b:
        assert a.clip_ids == b.clip_ids and a.sites == b.sites and len(a.sites) == 3
        assert {k: str(v) for k, v in a.attrs.items()} == {k: str(v) for k, v in b.attrs.items()}
        assert a.storage_dtype == "float32"
        for site in a.sites:
            x, y = a.h5[f"sites/{site}/frames"][:], b.h5[f"sites/{site}/frames"][:]
            assert x.dtype == np.float32 and x.shape[0] > 100
            assert x.tobytes() == y.tobytes(), site
            assert a.h5[f"sites/{site}/pooled"][:].tobytes() == b.h5[f"sites/{site}/pooled"][:].tobytes(), site


def test_probe_sae_and_patch_results_are_identical(runs):
    a, b = runs
    for rel in SAME_BYTES[4:]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    sweep = pd.read_csv(a / "results/probe/sweep.tsv", sep="\t")
    assert len(sweep) > 10 and sweep["value"].notna().any()
    ma, mb = (json.loads((w / "results/sae/metrics.json").read_text()) for w in runs)
    assert ma.keys() == mb.keys() and {k: v for k, v in ma.items() if k not in TIMINGS} == \
        {k: v for k, v in mb.items() if k not in TIMINGS}
    assert 0 < ma["explained_variance"] <= 1
    assert len(pd.read_csv(a / "results/patch/effects.tsv", sep="\t")) > 0
