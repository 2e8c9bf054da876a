"""The RAVDESS x URDU transfer study file: its dry run plans the transfer stage for both models on
both datasets from the downloads (no `root`; tests/test_studies.py plans its `all`, which includes transfer);
its datasets and models are those of ravdess_whisper.yaml, so the two studies share the RAVDESS stores."""

from __future__ import annotations

import yaml

from test_ravdess_study import REPO, snakemake

STUDY = REPO / "config" / "studies" / "ravdess_urdu.yaml"
TARGETS = [f"results/transfer/ravdess_urdu/{m}/transfer.tsv" for m in ("whisper-base", "whisper-tiny-en")]


def _jobs(stdout: str) -> dict[str, int]:
    return {p[0]: int(p[1]) for p in (line.split() for line in stdout.splitlines()) if len(p) == 2 and p[1].isdigit()}


def test_the_study_plans_transfer_for_both_models_from_the_downloads(tmp_path):
    cfg = yaml.safe_load(STUDY.read_text())
    for name in ("ravdess", "urdu"):
        cfg["datasets"][name][name] = {}  # no root: Zenodo and the authors' GitHub archive
    result = snakemake(tmp_path, cfg, *TARGETS, "-n", "--quiet", "rules")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _jobs(result.stdout) == {"raw": 2, "manifest": 2, "decode": 2, "extract": 4, "acoustic_features": 2,
                                    "transfer": 2, "total": 14}


def test_the_study_shares_ravdess_and_the_models_with_ravdess_whisper():
    mine = yaml.safe_load(STUDY.read_text())
    theirs = yaml.safe_load((REPO / "config" / "studies" / "ravdess_whisper.yaml").read_text())
    assert mine["models"] == theirs["models"]
    assert {k: v for k, v in mine["datasets"]["ravdess"].items() if k != "label_map"} == theirs["datasets"]["ravdess"]
