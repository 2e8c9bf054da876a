"""Every example study in config/studies/ validates and plans a DAG (dry run): a study file is
what a user runs, so a stale key or a broken cross-reference there is a bug."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted((REPO / "config" / "studies").glob("*.yaml"))


def placeholder_data(study: Path, work: Path) -> None:
    """The user's own files a study names (its folder of recordings, its video QA annotations and
    videos), as empty placeholders in the working directory: the config check reads them (label
    folders, paths) when the workflow is planned, but decodes nothing."""
    cfg = yaml.safe_load(study.read_text())
    for d in cfg["datasets"].values():
        if d["source"] == "folder":
            labels = d["folder"].get("labels") or [c[e] for s in cfg["studies"].values()
                                                  for c in s.get("contrasts", []) for e in ("source", "target")]
            for label in labels:
                (work / d["folder"]["root"] / label).mkdir(parents=True, exist_ok=True)
                (work / d["folder"]["root"] / label / "anna_1.wav").touch()
        if d["source"] == "video_qa":
            (work / d["video_qa"]["videos"]).mkdir(parents=True, exist_ok=True)
            (work / d["video_qa"]["annotations"]).write_text("[]")


@pytest.mark.parametrize("study", STUDIES, ids=[p.stem for p in STUDIES])
def test_study_file_plans_extraction_and_probes(study, tmp_path):
    placeholder_data(study, tmp_path)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(study), "-n", "--quiet", "rules", "--cores", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {p[0]: int(p[1]) for p in (line.split() for line in result.stdout.splitlines())
            if len(p) == 2 and p[1].isdigit()}
    datasets = yaml.safe_load(study.read_text())["datasets"]
    assert jobs.get("extract", 0) >= 1 and jobs.get("probe", 0) >= 1 and jobs.get("manifest") == len(datasets), jobs
