"""A real SLURM run of the workflow on this machine, checked against a local run.

Starts a single-node SLURM (munged, slurmctld, slurmd; every file in one temporary folder, the
system's own configuration untouched), runs the tiny workflow config of tests/test_workflow.py
through `--profile profiles/slurm` into one directory and with the local executor into another,
and compares what they wrote: the manifests, every number of the probe sweep, the store's clip
ids and pooled activations, the SAE metrics and the patching summary (steering and head-level
patching are left out of this config: minutes each, no scheduler path of their own). Prints (and writes to
`--out`) a JSON record: the SLURM job ids with their rules, and the wall time of each run.

    python bench/slurm_local.py [--work DIR] [--out result.json]

Needs the Debian packages slurmctld, slurmd, slurm-client and munge (run as root: the daemons
run as root with a throwaway munge key), and `pip install -e ".[cluster,test]"`.

Job state is read with `squeue` (`--slurm-status-command squeue`): this cluster has no
accounting daemon (slurmdbd), which `sacct` needs; MinJobAge is raised so that finished jobs stay
visible to squeue long enough. There is no GPU here (and no GRES configured), so the GPU rules'
`gpu` request is set to 0 on the command line, and no account is passed (`--slurm-no-account`; plugin
2.8.0 ignores it, fails to guess an account with sacct and submits without one, as wanted here).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPU_RULES = ["extract", "extract_shard", "patch", "steer", "sae"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """A one-node SLURM cluster in `root` (config, state, logs, munge socket and key)."""

    def __init__(self, root: Path, cpus: int | None = None, mem_mb: int | None = None):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        if mem_mb is None:
            with open("/proc/meminfo") as f:
                mem_mb = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) // 1024
        self.mem_mb = mem_mb
        self.pids: dict[str, int] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    def write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = r / "munge" / "munge.socket"
        (r / "slurm.conf").write_text(f"""\
ClusterName=affectlens
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
# Finished jobs stay in squeue this long (seconds): the executor reads their final state there.
MinJobAge=3600
SlurmdParameters=config_overrides
NodeName={self.host} CPUs={self.cpus} RealMemory={self.mem_mb} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def write_srun_wrapper(self) -> None:
        """An `srun` first on PATH that sets SLURM_CONF: inside a job, the executor's jobstep plugin
        calls srun with every SLURM_* variable but a few removed, SLURM_CONF included, so srun would
        look for /etc/slurm/slurm.conf (a real cluster has its config there, or runs configless)."""
        bin_dir = self.root / "bin"
        bin_dir.mkdir(exist_ok=True)
        wrapper = bin_dir / "srun"
        wrapper.write_text(f'#!/bin/sh\nSLURM_CONF="{self.root / "slurm.conf"}" exec {shutil.which("srun")} "$@"\n')
        wrapper.chmod(0o755)
        self.env["PATH"] = f"{bin_dir}{os.pathsep}{self.env.get('PATH', '')}"

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.pids[name] = p.pid

    def start(self, timeout: float = 60) -> None:
        self.write_config()
        self.write_srun_wrapper()
        m = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.host])
        self._wait(self._node_idle, timeout, "node idle in sinfo")

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, env=self.env)
        return out.returncode == 0 and out.stdout.strip().startswith("idle")

    def _wait(self, ok, timeout: float, what: str) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if ok():
                return
            for name, pid in self.pids.items():
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            time.sleep(0.5)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "log").glob("*"))
                         if p.is_file())
        raise RuntimeError(f"SLURM: timed out waiting for {what}\n{logs}")

    def stop(self) -> None:
        subprocess.run(["scontrol", "shutdown"], capture_output=True, env=self.env, timeout=30)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.get(name)
            if pid is None:
                continue
            for _ in range(20):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        break
                except ChildProcessError:
                    pass
                time.sleep(0.25)
            else:
                try:
                    os.kill(pid, 15)
                    os.waitpid(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass


def tiny_config(work: Path) -> Path:
    """tests/test_workflow.py's tiny config, with its tiny random Whisper saved under `work`, less
    the two slowest parts, which add no scheduler path of their own (their rules request what
    extract, sae and patch request): steering, and head-level patching (attn_heads sites)."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_workflow import TINY, tiny_whisper  # noqa: E402

    import yaml

    cfg = json.loads(json.dumps(TINY))
    model = work / "tiny-whisper"
    if not (model / "config.json").exists():
        tiny_whisper(model)
    for m in cfg["models"].values():  # `tiny` and its steering `judge`: both the one tiny Whisper, as in conftest.py
        if m["source"] is None:
            m["source"] = str(model)
        m["sites"] = [s for s in m["sites"] if not s.endswith("attn_heads")]
        m["steer_site"] = None
    cfg["steer"]["judge_models"] = []
    path = work / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snakemake(workdir: Path, configfile: Path, *args: str, env=None) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile), *args]
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=env)
    (workdir / "snakemake.out").write_text(out.stdout + "\n" + out.stderr)
    return out, time.time() - t0


def slurm_args() -> list[str]:
    return ["--profile", str(REPO / "profiles" / "slurm"), "--slurm-status-command", "squeue",
            "--slurm-no-account", "--slurm-init-seconds-before-status-checks", "5",
            "--set-resources", *[f"{rule}:gpu=0" for rule in GPU_RULES]]


def submitted_jobs(text: str) -> list[dict]:
    """[{slurm_jobid, rule, snakemake_jobid}] from a Snakemake log: each job block ("rule X:" ...
    "jobid: N") names its rule, and "Job N has been submitted with SLURM jobid M" its SLURM id."""
    rule_of, rule, jobs = {}, None, []
    for line in text.splitlines():
        m = re.match(r"\s*(?:local)?rule (\w+):$", line)
        if m:
            rule = m.group(1)
        m = re.match(r"\s+jobid: (\d+)$", line)
        if m and rule:
            rule_of[int(m.group(1))] = rule
        m = re.search(r"Job (\d+) has been submitted with SLURM jobid (\d+)", line)
        if m:
            jobs.append({"slurm_jobid": int(m.group(2)), "rule": rule_of.get(int(m.group(1))),
                         "snakemake_jobid": int(m.group(1))})
    return jobs


def compare(local: Path, slurm: Path) -> dict:
    """What the two runs wrote, side by side; raises AssertionError on any difference."""
    import h5py
    import numpy as np
    import pandas as pd

    out = {}
    for rel in ("results/manifest/demo.tsv", "results/decode/demo/manifest.tsv"):
        a, b = (pd.read_csv(d / rel, sep="\t") for d in (local, slurm))
        for df, d in ((a, local), (b, slurm)):  # decoded paths point into each run's own folder
            if "path" in df:
                df["path"] = df["path"].astype(str).str.replace(str(d), "", regex=False)
        pd.testing.assert_frame_equal(a, b)
        out[rel] = {"rows": len(a)}
    rel = "results/probe/demo/tiny/sweep.tsv"
    a, b = (pd.read_csv(d / rel, sep="\t") for d in (local, slurm))
    pd.testing.assert_frame_equal(a.drop(columns=a.select_dtypes("number").columns),
                                  b.drop(columns=b.select_dtypes("number").columns))
    num = a.select_dtypes("number").columns
    diff = np.nanmax(np.abs(a[num].to_numpy(float) - b[num].to_numpy(float)))
    assert np.array_equal(a[num].isna().to_numpy(), b[num].isna().to_numpy())
    assert diff == 0, f"probe sweep numbers differ by up to {diff}"
    out[rel] = {"rows": len(a), "numeric_columns": len(num), "max_abs_diff": float(diff)}
    rel = "results/extract/demo/tiny.h5"
    with h5py.File(local / rel) as fa, h5py.File(slurm / rel) as fb:
        assert fa["clip_ids"][:].tolist() == fb["clip_ids"][:].tolist()
        sites = json.loads(fa.attrs["sites"])
        assert sites == json.loads(fb.attrs["sites"])
        pooled = max(float(np.abs(fa[f"sites/{s}/pooled"][:] - fb[f"sites/{s}/pooled"][:]).max()) for s in sites)
        out[rel] = {"clips": len(fa["clip_ids"]), "sites": len(sites), "pooled_max_abs_diff": pooled}
    rel = "results/sae/demo/tiny/encoder.blocks.0.resid_post/metrics.json"
    timing = {"samples_per_second", "seconds"}  # the only fields that may differ
    ma, mb = ({k: v for k, v in json.loads((d / rel).read_text()).items() if k not in timing} for d in (local, slurm))
    assert ma == mb, (ma, mb)
    out[rel] = {"equal_fields": len(ma), "explained_variance": ma["explained_variance"]}
    rel = "results/patch/demo/tiny/sad-to-happy/summary.tsv"
    a, b = (pd.read_csv(d / rel, sep="\t") for d in (local, slurm))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    out[rel] = {"rows": len(a), "identical": True}
    return out


def run(work: Path) -> dict:
    for tool in ("slurmctld", "slurmd", "munged", "sbatch", "squeue"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install slurmctld slurmd slurm-client munge)")
    work.mkdir(parents=True, exist_ok=True)
    config = tiny_config(work)
    cluster = LocalSlurm(work / "slurm")
    record: dict = {"host": cluster.host, "cpus": cluster.cpus, "mem_mb": cluster.mem_mb}
    t0 = time.time()
    cluster.start()
    record["cluster_start_s"] = round(time.time() - t0, 1)
    try:
        slurm_dir = work / "slurm-run"
        slurm_dir.mkdir(exist_ok=True)
        out, secs = snakemake(slurm_dir, config, *slurm_args(), env=cluster.env)
        text = out.stdout + out.stderr
        record["slurm"] = {"returncode": out.returncode, "wall_s": round(secs, 1)}
        record["slurm"]["jobs"] = submitted_jobs(text)
        q = subprocess.run(["squeue", "-h", "--states=all", "-o", "%i %T %M %C %m %k"], capture_output=True,
                           text=True, env=cluster.env)
        record["slurm"]["squeue"] = q.stdout.strip().splitlines()
        if out.returncode != 0:
            record["slurm"]["tail"] = text[-6000:]
            return record
    finally:
        cluster.stop()
    local_dir = work / "local-run"
    local_dir.mkdir(exist_ok=True)
    out, secs = snakemake(local_dir, config, "--cores", "2")
    record["local"] = {"returncode": out.returncode, "wall_s": round(secs, 1)}
    if out.returncode != 0:
        record["local"]["tail"] = (out.stdout + out.stderr)[-6000:]
        return record
    record["compare"] = compare(local_dir, slurm_dir)
    record["equal"] = True
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, help="working folder (default: a new temporary one)")
    ap.add_argument("--out", type=Path, help="also write the JSON record here")
    a = ap.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="affectlens-slurm-"))
    record = run(work.resolve())
    record["work"] = str(work)
    text = json.dumps(record, indent=2, default=str)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0 if record.get("equal") else 1


if __name__ == "__main__":
    sys.exit(main())
