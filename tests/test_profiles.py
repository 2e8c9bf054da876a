"""The execution profiles (profiles/default, profiles/slurm, profiles/kubernetes) on the tiny
workflow config of test_workflow.py: a dry run of each shows the resources the rules declare,
and (marked `slurm`, where the SLURM daemons are installed) a real single-node SLURM run gives
the same results as a local run (bench/slurm_local.py)."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_workflow import REPO, TINY, tiny_whisper

pytestmark = [pytest.mark.workflow]

GPU_RULES = {"extract": 8000, "patch": 8000, "steer": 8000, "sae": 6000}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    work = tmp_path_factory.mktemp("profiles")
    cfg = json.loads(json.dumps(TINY))
    weights = str(tiny_whisper(work / "tiny-whisper"))
    for model in cfg["models"].values():  # the steered model and its judge (steer.judge_models)
        model["source"] = weights
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return work


def dry_run(work: Path, profile: str, *args: str) -> str:
    run_dir = work / f"run-{profile}"
    run_dir.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(run_dir),
           "--configfile", str(work / "tiny.yaml"), "--profile", str(REPO / "profiles" / profile), "-n", *args]
    if profile == "default":
        cmd += ["--cores", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=run_dir,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout + out.stderr


def jobs_of(text: str) -> dict[str, dict]:
    """{rule: {"threads": .., "resources": {name: value}, "input": ..}} from a dry run's job blocks."""
    jobs, rule = {}, None
    for line in text.splitlines():
        m = re.match(r"(?:local)?rule (\w+):$", line.strip())
        if m:
            rule = m.group(1)
            jobs[rule] = {"threads": 1, "resources": {}, "input": ""}
        elif rule and line.strip().startswith("resources:"):
            items = [kv.split("=", 1) for kv in line.split(":", 1)[1].split(", ")]
            jobs[rule]["resources"] = {k.strip(): v.strip() for k, v in items}
        elif rule and line.strip().startswith("threads:"):
            jobs[rule]["threads"] = int(line.split(":")[1])
        elif rule and line.strip().startswith("input:"):
            jobs[rule]["input"] = line.split(":", 1)[1]
    return jobs


def check_gpu_rules(jobs: dict, threads: bool = False) -> None:
    for rule, mem in GPU_RULES.items():
        r = jobs[rule]["resources"]
        assert r["gpu"] == "1", (rule, r)
        assert int(r["mem_mb"]) == mem, (rule, r)  # first attempt: the base request
        assert int(r["runtime"]) >= 180, (rule, r)
        if threads:  # a dry run prints threads only where it knows the cores (local)
            assert jobs[rule]["threads"] == 2, rule
    assert "gpu" not in jobs["probe"]["resources"] and int(jobs["probe"]["resources"]["mem_mb"]) == 4000


def test_default_profile_dry_run(tiny):
    text = dry_run(tiny, "default")
    assert re.search(r"Using .*profiles/default", text)
    jobs = jobs_of(text)
    assert {"raw", "manifest", "decode", "extract", "probe", "sae", "patch", "steer", "heatmaps", "steer_listen",
            "benchmarks", "all"} <= set(jobs)
    check_gpu_rules(jobs, threads=True)


def test_slurm_profile_dry_run(tiny):
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip('snakemake-executor-plugin-slurm is not installed (pip install -e ".[cluster]")')
    text = dry_run(tiny, "slurm")
    assert re.search(r"Using profiles? .*profiles/slurm", text)
    jobs = jobs_of(text)
    check_gpu_rules(jobs)
    # rules that declare nothing get the profile's default-resources
    assert jobs["steer_listen"]["resources"]["mem_mb"] == "4000" and jobs["steer_listen"]["resources"]["runtime"] == "60"


def test_kubernetes_profile_dry_run(tiny):
    if importlib.util.find_spec("snakemake_executor_plugin_kubernetes") is None:
        pytest.skip('snakemake-executor-plugin-kubernetes is not installed (pip install -e ".[cluster]")')
    try:
        import snakemake_executor_plugin_kubernetes  # noqa: F401
    except Exception as e:  # installed but broken (e.g. the kubernetes client's dependencies)
        pytest.skip(f"the kubernetes executor plugin does not import: {e}")
    if importlib.util.find_spec("snakemake_storage_plugin_fs") is None:
        pytest.skip('snakemake-storage-plugin-fs is not installed (pip install -e ".[cluster]")')
    text = dry_run(tiny, "kubernetes")
    jobs = jobs_of(text)
    check_gpu_rules(jobs)
    assert jobs["extract"]["resources"]["gpu_manufacturer"] == "nvidia"
    # no shared filesystem: results go through the storage provider on the mounted volume,
    # while the local model folder's weights are read in place
    assert "/data/affectlens/results/extract/demo/tiny.h5 (retrieve from storage)" in jobs["probe"]["input"]
    assert str(tiny / "tiny-whisper" / "model.safetensors") in jobs["extract"]["input"]
    assert "tiny-whisper/model.safetensors (retrieve" not in jobs["extract"]["input"]


def rule_block(name: str) -> str:
    for f in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        m = re.search(rf"^rule {name}:\n(.*?)(?=^\S)", f.read_text() + "\nEND", re.M | re.S)
        if m:
            return m.group(1)
    raise AssertionError(f"no rule {name}")


def test_retried_rules_ask_for_more_memory_each_attempt(tmp_path, monkeypatch):
    """The GPU rules are retried, each attempt after one killed without a word (the out-of-memory
    killer, a scheduler's memory limit) with mem_mb = base x attempt, after an error a retry cannot
    fix with the base again (a dry run only ever shows attempt 1, so the callable itself is checked
    here with the job's log path from its rule; tests/test_retries.py runs both on the real DAG)."""
    from types import SimpleNamespace

    from snakemake.io import apply_wildcards

    from affectlens import faults

    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    source = re.search(r"^def mem_by_attempt\(.*?(?=^\S)", common, re.M | re.S).group(0)
    rule = SimpleNamespace(log=["logs/extract/{dataset}/{model}.log"])
    namespace = {"workflow": SimpleNamespace(get_rule=lambda name: rule), "apply_wildcards": apply_wildcards,
                 "faults": faults}
    exec(source, namespace)
    mem = namespace["mem_by_attempt"](8000)
    wildcards = {"dataset": "demo", "model": "m"}
    monkeypatch.chdir(tmp_path)
    faults.reset()
    assert [mem(wildcards, attempt, "extract") for attempt in (1, 2, 3)] == [8000, 16000, 24000]
    faults.record("logs/extract/demo/m.log", "fatal", "ValueError: weights differ")
    assert [mem(wildcards, attempt, "extract") for attempt in (1, 2, 3)] == [8000, 8000, 8000]
    for rule, base in {**GPU_RULES, "extract_shard": 8000}.items():
        block = rule_block(rule)
        assert re.search(r"^\s+retries: 2$", block, re.M), rule
        assert f"mem_mb=mem_by_attempt({base})" in block, rule
        assert "gpu=" in block and "runtime=" in block, rule


def test_localrules_are_the_light_rules():
    text = (REPO / "workflow" / "rules" / "report.smk").read_text()
    local = set(re.search(r"^localrules:\n((?:\s+\w+,\n)+)", text, re.M).group(1).replace(",", "").split())
    assert local == {"all", "raw", "manifest", "dynamic_ratings", "probe_study", "heatmaps", "steer_listen",
                     "benchmarks"}


def test_profiles_declare_their_executor():
    slurm = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    k8s = yaml.safe_load((REPO / "profiles/kubernetes/config.yaml").read_text())
    assert slurm["executor"] == "slurm" and k8s["executor"] == "kubernetes"
    assert "executor" not in yaml.safe_load((REPO / "profiles/default/config.yaml").read_text())
    extra = "\n".join(l for l in (REPO / "pyproject.toml").read_text().splitlines() if "executor-plugin" in l)
    assert "snakemake-executor-plugin-slurm==" in extra and "snakemake-executor-plugin-kubernetes==" in extra


@pytest.mark.slurm
@pytest.mark.slow
def test_real_slurm_run_matches_local_run(tmp_path):
    """bench/slurm_local.py: a single-node SLURM cluster runs the tiny workflow through
    profiles/slurm; every result equals that of a local run."""
    missing = [t for t in ("slurmctld", "slurmd", "munged", "sbatch", "srun", "squeue") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"SLURM is not installed here ({', '.join(missing)} missing; apt-get install slurmctld slurmd "
                    "slurm-client munge)")
    if os.geteuid() != 0:
        pytest.skip("the throwaway SLURM cluster runs its daemons as root")
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip('snakemake-executor-plugin-slurm is not installed (pip install -e ".[cluster]")')
    out = subprocess.run([sys.executable, str(REPO / "bench" / "slurm_local.py"), "--work", str(tmp_path),
                          "--out", str(tmp_path / "result.json")], capture_output=True, text=True)
    assert (tmp_path / "result.json").exists(), out.stderr[-4000:]
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["slurm"]["returncode"] == 0, record["slurm"].get("tail")
    assert record["local"]["returncode"] == 0, record["local"].get("tail")
    submitted = {j["rule"] for j in record["slurm"]["jobs"]}
    # the heavy rules went through sbatch, each with its own SLURM job id; localrules did not
    assert {"decode", "extract", "probe", "sae", "patch"} <= submitted  # (steering is left out of its config)
    assert not submitted & {"raw", "manifest", "heatmaps", "steer_listen", "benchmarks", "all"}
    ids = [j["slurm_jobid"] for j in record["slurm"]["jobs"]]
    assert len(ids) == len(set(ids)) and all(i > 0 for i in ids)
    assert all(" COMPLETED " in line for line in record["slurm"]["squeue"])
    text = (tmp_path / "slurm-run" / "snakemake.out").read_text()
    assert "localrule heatmaps:" in text and "localrule raw:" in text
    cmp = record["compare"]
    assert record["equal"] is True
    assert cmp["results/probe/demo/tiny/sweep.tsv"]["max_abs_diff"] == 0
    assert cmp["results/extract/demo/tiny.h5"]["clips"] == 16
    assert cmp["results/manifest/demo.tsv"]["rows"] == 16
