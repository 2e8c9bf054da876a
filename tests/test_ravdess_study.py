"""The RAVDESS x Whisper study file: its dry run with Hugging Face model ids (what users with
internet run), and the real DAG on six actors of the real corpus (realdata: minutes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "config" / "studies" / "ravdess_whisper.yaml"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ravdess"


def snakemake(work: Path, cfg: dict, *args: str) -> subprocess.CompletedProcess:
    (work / "study.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(work / "study.yaml"), "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=work)


@pytest.mark.parametrize("model", [
    {"family": "wav2vec2", "source": "facebook/wav2vec2-base", "readout_site": "encoder.blocks.11.resid_post",
     "sae_sites": ["encoder.blocks.6.resid_post"], "steer_site": "encoder.blocks.4.resid_post"},
    {"family": "wavlm", "source": "microsoft/wavlm-base-plus", "sae_sites": [], "steer_site": None},
    {"family": "whisper", "source": "openai/whisper-small", "sae_sites": ["encoder.blocks.8.resid_post"]},
], ids=["wav2vec2", "wavlm", "whisper-hub"])
def test_the_study_file_with_a_hub_model_plans_every_stage(tmp_path, model):
    cfg = yaml.safe_load(STUDY.read_text())
    cfg["datasets"]["ravdess"]["ravdess"] = {}  # no root: the Zenodo download
    cfg["models"] = {"hub": {"sites": ["encoder.embed", "encoder.blocks.*.resid_post"], **model}}
    cfg["studies"]["ravdess"]["models"] = ["hub"]
    cfg["steer"]["judge_models"] = []  # the study's judges are its two Whisper models
    result = snakemake(tmp_path, cfg, "-n", "--quiet", "rules")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            jobs[parts[0]] = int(parts[1])
    contrasts = len(cfg["studies"]["ravdess"]["contrasts"])
    assert {k: jobs.get(k, 0) for k in ("raw", "manifest", "decode", "extract", "probe", "patch", "sae", "steer")} == {
        "raw": 1, "manifest": 1, "decode": 1, "extract": 1, "probe": 1, "patch": contrasts,
        "sae": len(model["sae_sites"]), "steer": contrasts if model.get("steer_site") else 0}


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")
def test_six_real_actors_whisper_reads_emotion_above_chance_and_the_mfcc_baseline(tmp_path):
    cfg = yaml.safe_load(STUDY.read_text())
    cfg["datasets"]["ravdess"]["ravdess"] = {"root": str(SHARED), "actors": [1, 2, 3, 4, 5, 6]}
    cfg["models"] = {"whisper-tiny-en": cfg["models"]["whisper-tiny-en"]}
    cfg["studies"]["ravdess"]["models"] = ["whisper-tiny-en"]
    cfg["steer"]["judge_models"] = []
    cfg["probe"] |= {"n_permutations": 19}  # the study's actor-grouped folds, fewer permutations
    target = "results/probe/ravdess/whisper-tiny-en/sweep.tsv"
    result = snakemake(tmp_path, cfg, target)
    assert result.returncode == 0, result.stderr[-4000:]
    sweep = pd.read_csv(tmp_path / target, sep="\t")
    acc = sweep[(sweep.probe == "label") & (sweep.metric == "accuracy")].set_index("site")
    mfcc = acc.loc["acoustic.mfcc_stats"]
    layers = acc.drop(index="acoustic.mfcc_stats")
    best = layers.loc[layers.value.idxmax()]
    assert best.chance == pytest.approx(1 / 7.5, abs=0.01)  # 8 classes, neutral half as common
    assert best.value > 3 * best.chance and best.p_value == pytest.approx(1 / 20)
    assert best.value > mfcc.ci_high, (best.value, mfcc.ci_low, mfcc.ci_high)
    assert set(pd.read_csv(tmp_path / "results/manifest/ravdess.tsv", sep="\t").speaker) == {
        f"actor{i:02d}" for i in range(1, 7)}
