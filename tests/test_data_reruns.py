"""A user's own data drives the DAG (issue 20, item 2): the `raw` rule takes a cheap listing of the
dataset's folder or table (names, sizes, modification times; the table's bytes) as a parameter, so
adding, removing, relabelling or replacing a recording reruns that dataset's jobs and nothing else,
and touching nothing leaves nothing to do. Config params are compared in one key order (item 7):
reordering the keys of a config file reruns nothing.

The real Snakemake DAG on a tiny config: two datasets of the `folder` source (one sub-folder per
label; a table) and a tiny random-init Whisper, up to the activation stores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml


REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.workflow, pytest.mark.slow]
TARGETS = ["results/extract/rec/tiny.h5", "results/extract/tab/tiny.h5"]
STAGES = ("raw", "manifest", "decode", "extract")


def tone(path: Path, freq: float, seconds: float = 0.6):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)


def config(model: str) -> dict:
    return {"datasets": {"rec": {"source": "folder", "folder": {"root": "rec"}},
                         "tab": {"source": "folder", "folder": {"root": "tabroot", "csv": "table.csv"}}},
            "models": {"tiny": {"family": "whisper", "source": model, "sites": ["encoder.blocks.*.resid_post"],
                                "batch_size": 4}},
            "studies": {"s": {"datasets": ["rec", "tab"], "models": ["tiny"]}}}


def snakemake(work: Path, *args: str, configfile: str = "tiny.yaml") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(work / configfile), "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=work)


def planned(work: Path, *args: str, configfile: str = "tiny.yaml") -> dict[str, set[str]]:
    """{rule: {dataset, ...}} of the jobs a dry run plans for TARGETS."""
    out = snakemake(work, "-n", *TARGETS, *args, configfile=configfile)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    jobs, rule = {}, None
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith("rule ") or line.startswith("localrule "):
            rule = line.split()[1].rstrip(":")
        elif line.startswith("wildcards:") and rule in STAGES:
            wc = dict(kv.split("=") for kv in line.removeprefix("wildcards:").strip().split(", "))
            jobs.setdefault(rule, set()).add(wc["dataset"])
    return jobs


def nothing_to_do(work: Path, *args: str, configfile: str = "tiny.yaml") -> bool:
    out = snakemake(work, "-n", *TARGETS, *args, configfile=configfile)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return "Nothing to be done" in out.stdout + out.stderr


def run(work: Path) -> None:
    out = snakemake(work, *TARGETS)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def stored(work: Path, dataset: str) -> dict[str, str]:
    """{source clip id: label} of the clips in the dataset's activation store."""
    manifest = pd.read_csv(work / f"results/decode/{dataset}/manifest.tsv", sep="\t")
    with h5py.File(work / f"results/extract/{dataset}/tiny.h5") as f:
        ids = [c.decode() for c in f["clip_ids"][:]]
    assert ids == manifest["clip_id"].tolist()
    original = manifest["source_clip_id"].fillna(manifest["clip_id"]) if "source_clip_id" in manifest else \
        manifest["clip_id"]
    return dict(zip(original, manifest["label"]))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from test_workflow import tiny_whisper

    work = tmp_path_factory.mktemp("reruns")
    for i, (label, name) in enumerate([("happy", "a"), ("happy", "b"), ("sad", "c"), ("sad", "d")]):
        tone(work / "rec" / label / f"{name}.wav", 200 + 40 * i)
        tone(work / "tabroot" / f"t{i}.wav", 300 + 40 * i)
    (work / "table.csv").write_text("path,label\nt0.wav,happy\nt1.wav,happy\nt2.wav,sad\nt3.wav,sad\n")
    (work / "tiny.yaml").write_text(yaml.safe_dump(config(str(tiny_whisper(work / "tiny-whisper")))))
    run(work)
    assert stored(work, "rec") == {"happy/a": "happy", "happy/b": "happy", "sad/c": "sad", "sad/d": "sad"}
    return work


def test_touching_nothing_leaves_nothing_to_do(work):
    assert nothing_to_do(work)
    assert nothing_to_do(work, "--rerun-triggers", "params")


def test_reordered_config_keys_rerun_nothing(work):
    def reversed_keys(value):
        if isinstance(value, dict):
            return {k: reversed_keys(value[k]) for k in reversed(list(value))}
        return value

    cfg = yaml.safe_load((work / "tiny.yaml").read_text())
    # every mapping in reverse order, with the schema's defaults written out in reverse too
    cfg["models"]["tiny"].update(dtype="float32", chunk_clips=64, device="auto")
    cfg["datasets"]["rec"].update(min_duration=0.2, clip_check="decode", label_column="label")
    cfg["datasets"]["rec"]["folder"]["extensions"] = ["wav", "flac", "mp3", "ogg", "opus", "m4a", "aac", "mp4",
                                                      "webm", "mkv"]
    cfg["probe"] = {"seed": 0, "C": 1.0}
    (work / "reordered.yaml").write_text(yaml.safe_dump(reversed_keys(cfg), sort_keys=False))
    assert list(yaml.safe_load((work / "reordered.yaml").read_text())["models"]["tiny"])[0] == "device"
    assert nothing_to_do(work, "--rerun-triggers", "params", configfile="reordered.yaml")
    assert nothing_to_do(work, configfile="reordered.yaml")


def test_a_file_that_is_not_a_recording_changes_nothing(work):
    (work / "rec" / "happy" / "notes.txt").write_text("recorded on Tuesday\n")
    (work / "tabroot" / "t9.wav").write_bytes(b"")  # a recording the table does not name
    try:
        assert nothing_to_do(work)
    finally:
        (work / "rec" / "happy" / "notes.txt").unlink()
        (work / "tabroot" / "t9.wav").unlink()


def test_adding_a_recording_reruns_its_dataset_and_the_clip_reaches_the_store(work):
    tone(work / "rec" / "sad" / "e.wav", 500)
    assert planned(work) == {rule: {"rec"} for rule in STAGES}  # the other dataset is left alone
    assert planned(work, "--rerun-triggers", "params") == {rule: {"rec"} for rule in STAGES}
    run(work)
    assert stored(work, "rec")["sad/e"] == "sad" and len(stored(work, "rec")) == 5
    assert nothing_to_do(work)


def test_removing_a_recording_takes_it_out(work):
    (work / "rec" / "happy" / "b.wav").unlink()
    assert planned(work) == {rule: {"rec"} for rule in STAGES}
    run(work)
    assert "happy/b" not in stored(work, "rec") and len(stored(work, "rec")) == 4


def test_moving_a_recording_to_another_label_folder_relabels_it(work):
    os.rename(work / "rec" / "happy" / "a.wav", work / "rec" / "sad" / "a.wav")
    assert planned(work) == {rule: {"rec"} for rule in STAGES}
    run(work)
    labels = stored(work, "rec")
    assert labels["sad/a"] == "sad" and "happy/a" not in labels


def test_relabelling_a_row_of_the_table_reruns_that_dataset(work):
    before = stored(work, "tab")
    assert before == {"t0": "happy", "t1": "happy", "t2": "sad", "t3": "sad"}
    table = work / "table.csv"
    table.write_text(table.read_text().replace("t1.wav,happy", "t1.wav,sad"))
    assert planned(work) == {rule: {"tab"} for rule in STAGES}
    run(work)
    assert stored(work, "tab") == {**before, "t1": "sad"}
    assert nothing_to_do(work)


def test_replacing_a_recording_in_place_reruns(work):
    """Same name, other audio (size and modification time differ)."""
    target = work / "tabroot" / "t0.wav"
    st = target.stat()
    tone(target, 700, seconds=0.9)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert planned(work) == {rule: {"tab"} for rule in STAGES}
    run(work)
    decoded = pd.read_csv(work / "results/decode/tab/manifest.tsv", sep="\t").set_index("clip_id")
    assert decoded.loc["t0", "duration"] == pytest.approx(0.9)
    assert nothing_to_do(work)
