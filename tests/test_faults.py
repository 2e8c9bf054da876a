"""Faults: a process SIGKILLed in the middle of writing its output (activation store, SAE
checkpoint and artifacts, patching tables), a disk that fills up mid-write, a download cut off or
changed under us. The rerun must notice what is incomplete, redo or resume it, and end with what
an uninterrupted run gives (bitwise: float32 on the CPU); readers refuse cut-off files loudly;
nothing half-written ever sits under a final name.

The kills are real: the stage function runs in a child Python process whose writer is wrapped
to write part of its output, then `os.kill(os.getpid(), SIGKILL)`.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from affectlens import stages
from affectlens.store import IncompleteStoreError, Store, _open_left_behind

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import bench_scale  # noqa: E402  (the synthetic corpus and tiny model shared with the scale benchmark)

torch.set_num_threads(1)
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --- a tiny real setup: corpus, model folder, reference (uninterrupted) outputs -----------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    model = bench_scale.make_model(work / "model")
    manifest = bench_scale.make_corpus(work / "corpus", n_speakers=3, n_sentences=2)
    cfg = bench_scale.workflow_config(model, sae={"n_samples": 3000, "batch_size": 128})
    cfg["models"]["tiny"]["chunk_clips"] = 5  # 12 clips: 3 commits
    (work / "cfg.json").write_text(json.dumps(cfg))
    ref = work / "ref"
    stages.extract.extract(manifest, cfg["models"]["tiny"], ref / "store.h5")
    return work, manifest, cfg, ref


def run_child(work: Path, body: str) -> subprocess.CompletedProcess:
    """Run `body` in a fresh interpreter (cwd = work) with `cfg`, `manifest` and `stages` defined."""
    head = textwrap.dedent(f"""
        import json, os, signal, sys
        from pathlib import Path
        import torch
        torch.set_num_threads(1)
        sys.path.insert(0, {str(REPO / "bench")!r})
        from affectlens import stages
        cfg = json.loads(Path("cfg.json").read_text())
        manifest = Path("corpus/manifest.tsv")
        def die():
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-c", head + textwrap.dedent(body)], cwd=work, capture_output=True,
                          text=True, env=env, timeout=600)


def assert_killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def store_contents(path):
    with Store(path) as s:
        return {"clip_ids": s.clip_ids, "n_frames": s.n_frames.tolist(),
                **{f"{site}/frames": np.concatenate(list(s.frame_chunks(site))) for site in s.sites},
                **{f"{site}/pooled": s.pooled(site) for site in s.sites}}


def assert_same_store(a, b):
    ca, cb = store_contents(a), store_contents(b)
    assert ca.keys() == cb.keys()
    for key in ca:
        if isinstance(ca[key], np.ndarray):
            assert ca[key].dtype == np.float32 and np.array_equal(ca[key], cb[key]), key  # bitwise
        else:
            assert ca[key] == cb[key], key


# --- extraction ------------------------------------------------------------------------------------

KILLS = {  # where, in the writer of the growing store, the process dies; what it has committed then
    "rows": ("""
        real = ResumableStoreWriter.append_rows
        def append_rows(self, *a, **k):
            real(self, *a, **k)
            if self._row > 5:  # the second chunk's rows are on disk, not yet committed
                self.h5.flush()
                die()
        ResumableStoreWriter.append_rows = append_rows
    """, 5),
    "counts": ("""
        def commit(self):
            self.h5.flush()
            self._write_counts(top=False)
            self.h5.flush()
            if self._row > 5:  # its frame counts are written, the commit mark is not
                die()
            self.h5.attrs["clips_written"] = self._row
            self.h5.flush()
        ResumableStoreWriter.commit = commit
    """, 5),
    "finish": ("""
        def close(self):
            self._write_counts(top=True)
            self.h5.attrs["complete"] = True
            self.h5.flush()
            die()  # finished, not yet renamed to the store's name
        ResumableStoreWriter.close = close
    """, 12),
}


@pytest.mark.parametrize("where", list(KILLS))
def test_extraction_killed_while_writing_its_store_resumes_to_the_uninterrupted_store(setup, where):
    """Killed inside the HDF5 writes of the growing store: with a chunk's rows written, with their
    counts written too, and with the store finished but not renamed. The file stays readable (the
    single-writer mode), never reads as a store, and the rerun resumes after its last commit."""
    work, manifest, cfg, ref = setup
    out = work / "killed" / where / "store.h5"
    patch, committed = KILLS[where]
    proc = run_child(work, "from affectlens.store import ResumableStoreWriter\n" + textwrap.dedent(patch) + f"""
stages.extract.extract(manifest, cfg["models"]["tiny"], {str(out)!r})
""")
    assert_killed(proc)
    growing = out.with_name("store.h5.parts") / "store.h5"
    assert growing.stat().st_size > 0 and not out.exists()
    with pytest.raises(IncompleteStoreError, match=r"store\.h5.*(incomplete|not a readable)"):
        Store(growing)
    with _open_left_behind(growing) as f:
        assert int(f.attrs["clips_written"]) == committed
    stages.extract.extract(manifest, cfg["models"]["tiny"], out)
    assert not growing.parent.exists()
    assert_same_store(ref / "store.h5", out)


def test_a_truncated_store_is_refused_loudly_and_a_rerun_replaces_it(setup, tmp_path):
    work, manifest, cfg, ref = setup
    data = (ref / "store.h5").read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 2048):
        (tmp_path / "store.h5").write_bytes(data[:cut])
        with pytest.raises(IncompleteStoreError, match=r"store\.h5 is not a readable HDF5 store .*truncated file.*"
                                                       r"delete it and rerun extract"):
            Store(tmp_path / "store.h5")
    stages.extract.extract(manifest, cfg["models"]["tiny"], tmp_path / "store.h5")
    assert_same_store(ref / "store.h5", tmp_path / "store.h5")


def test_disk_full_while_writing_a_store_leaves_nothing(setup, tmp_path, monkeypatch):
    work, manifest, cfg, ref = setup
    from affectlens.store import StoreWriter

    real = StoreWriter.append_rows

    def full(self, *a, **k):
        real(self, *a, **k)  # some rows made it to disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.tmp))

    monkeypatch.setattr(StoreWriter, "append_rows", full)
    out = tmp_path / "x" / "store.h5"
    with pytest.raises(OSError, match=r"No space left on device.*store\.h5\.parts/store\.h5") as e:
        stages.extract.extract(manifest, cfg["models"]["tiny"], out)
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in out.parent.rglob("*") if p.is_file()) == []  # nothing committed, nothing kept


# --- SAE training ------------------------------------------------------------------------------------

def sae_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "sae.safetensors"))


STABLE_METRICS = ("explained_variance", "normalised_mse", "l0", "dead_fraction", "train_dead_fraction",
                  "train_fvu_last", "samples_seen", "steps", "eval_frames", "train_frames")


def train(work, out_dir, checkpoint=None, every=300.0):
    from affectlens.sae.train import train_sae
    from affectlens.sae.topk import TopKConfig

    with Store(work / "ref" / "store.h5") as s:
        cfg = TopKConfig(d_in=s.dim(bench_scale.SAE_SITE), expansion=2, k=4, n_samples=3000, batch_size=128,
                         lr=3e-3, dead_tokens=1000, seed=0)
        return train_sae(s, bench_scale.SAE_SITE, cfg, out_dir, progress=False, device="cpu", checkpoint=checkpoint,
                         checkpoint_every_s=every)


SAE_CHILD = """
    import affectlens.sae.train as T, affectlens.sae.registry as R, torch
    sys.path.insert(0, {tests!r})
    from test_faults import train
    calls = [0]
    def cut(write, path, *a, **k):  # write the whole file, keep only its first half, die
        write(*a, **k)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[:len(data) // 2])
        die()
    if {victim!r} == "checkpoint":
        real = torch.save
        def save(obj, f, *a, **k):
            calls[0] += 1
            if calls[0] == 7:
                cut(lambda: real(obj, f, *a, **k), f)
            real(obj, f, *a, **k)
        T.torch.save = save
    else:
        real = R.save_file
        R.save_file = lambda tensors, f, *a, **k: cut(lambda: real(tensors, f, *a, **k), f)
    train(Path("."), Path({out!r}), checkpoint=Path({ck!r}), every=0.0)
"""


@pytest.mark.parametrize("victim", ["checkpoint", "artifact"])
def test_sae_training_killed_mid_write_resumes_to_the_uninterrupted_weights(setup, victim):
    """Killed while writing its 7th checkpoint (the 6th stays whole) or its sae.safetensors: the
    rerun resumes from the last whole checkpoint and ends on the uninterrupted weights, bitwise."""
    work, *_ = setup
    ref = work / "sae_ref"
    if not ref.exists():
        train(work, ref)
    out, ck = work / f"sae_{victim}", work / f"sae_{victim}.ck.pt"
    proc = run_child(work, SAE_CHILD.format(tests=str(REPO / "tests"), victim=victim, out=str(out), ck=str(ck)))
    assert_killed(proc)
    assert ck.is_file() and not (out / "metrics.json").exists()
    leftover = ck.with_name(ck.name + ".tmp") if victim == "checkpoint" else out / "sae.safetensors.tmp"
    assert leftover.is_file()  # what the kill cut short, never under the final name
    if victim == "artifact":
        assert not (out / "sae.safetensors").exists()
    metrics = train(work, out, checkpoint=ck, every=0.0)
    assert metrics["resumed_from_samples"] == (6 * 128 if victim == "checkpoint" else 3072)
    assert not ck.exists()
    want, got = sae_weights(ref), sae_weights(out)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    ref_metrics = json.loads((ref / "metrics.json").read_text())
    assert {k: metrics[k] for k in STABLE_METRICS} == {k: ref_metrics[k] for k in STABLE_METRICS}


def test_a_truncated_checkpoint_is_refused_naming_the_file(setup, tmp_path):
    from affectlens.sae.registry import build
    from affectlens.sae.train import CheckpointError, fit_array, load_checkpoint, save_checkpoint

    sae = build("topk", d_in=8, expansion=2, k=2, n_samples=512, batch_size=128)
    state = fit_array(sae, np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32))
    save_checkpoint(tmp_path / "ck.pt", sae, state)
    data = (tmp_path / "ck.pt").read_bytes()
    (tmp_path / "ck.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ck\.pt cannot be loaded safely .*truncated, corrupt.*delete it"):
        load_checkpoint(tmp_path / "ck.pt", build("topk", d_in=8, expansion=2, k=2, n_samples=512, batch_size=128))


def test_disk_full_while_saving_an_sae_or_checkpoint_leaves_the_old_files(setup, tmp_path, monkeypatch):
    import affectlens.sae.registry as registry
    import affectlens.sae.train as train_mod
    from affectlens.sae.registry import build, save_sae
    from affectlens.sae.train import fit_array, load_checkpoint, save_checkpoint

    sae = build("topk", d_in=8, expansion=2, k=2, n_samples=512, batch_size=128)
    state = fit_array(sae, np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32))
    save_checkpoint(tmp_path / "ck.pt", sae, state)
    before = (tmp_path / "ck.pt").read_bytes()

    def half_then_full(obj, f, *a, **k):
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise ENOSPC

    monkeypatch.setattr(train_mod.torch, "save", half_then_full)
    state.steps += 1
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / "ck.pt", sae, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"] and (tmp_path / "ck.pt").read_bytes() == before
    assert load_checkpoint(tmp_path / "ck.pt", sae).steps == state.steps - 1

    monkeypatch.setattr(registry, "save_file", lambda tensors, f, *a, **k: half_then_full(None, f))
    with pytest.raises(OSError, match="No space left"):
        save_sae(sae, tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json"]  # no weights, no temp file


# --- patching ------------------------------------------------------------------------------------------

def patch_outputs(folder: Path) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in ("pairs.tsv", "effects.tsv", "summary.tsv", "agreement.tsv")}


def run_patch(work, cfg, folder):
    stages.patch.patch(work / "ref" / "store.h5", work / "corpus" / "manifest.tsv", cfg["models"]["tiny"],
                 {"source": "sad", "target": "happy"}, cfg["patch"], "label", folder / "pairs.tsv",
                 folder / "effects.tsv", folder / "summary.tsv", folder / "agreement.tsv")


def test_patching_killed_while_writing_its_tables_reruns_to_the_same_tables(setup):
    work, manifest, cfg, _ = setup
    ref = work / "patch_ref"
    run_patch(work, cfg, ref)
    out = work / "patch_killed"
    proc = run_child(work, f"""
        import pandas as pd
        real = pd.DataFrame.to_csv
        def to_csv(self, path, *a, **k):
            if "effects" in str(path):  # half the rows reach the disk, then the process dies
                real(self.iloc[: len(self) // 2], path, *a, **k)
                die()
            return real(self, path, *a, **k)
        pd.DataFrame.to_csv = to_csv
        stages.patch.patch(Path("ref/store.h5"), manifest, cfg["models"]["tiny"], {{"source": "sad", "target": "happy"}},
                     cfg["patch"], "label", *[Path({str(out)!r}) / n for n in
                     ("pairs.tsv", "effects.tsv", "summary.tsv", "agreement.tsv")])
    """)
    assert_killed(proc)
    names = sorted(p.name for p in out.iterdir())
    assert "effects.tsv" not in names and "summary.tsv" not in names  # nothing half-written looks finished
    half = [p for p in out.iterdir() if p.name.startswith(".effects.") and ".partial" in p.name]
    assert len(half) == 1 and 0 < half[0].stat().st_size < len((ref / "effects.tsv").read_bytes())
    run_patch(work, cfg, out)
    assert patch_outputs(out) == patch_outputs(ref)


def test_disk_full_while_writing_a_table_leaves_no_file(tmp_path, monkeypatch):
    real = pd.DataFrame.to_csv

    def full(self, path, *a, **k):
        real(self.iloc[:1], path, *a, **k)
        raise ENOSPC

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    with pytest.raises(OSError, match="No space left"):
        stages.write_tsv(pd.DataFrame({"a": range(100)}), tmp_path / "t.tsv")
    assert list(tmp_path.iterdir()) == []


# --- downloads and archives ----------------------------------------------------------------------------

@pytest.fixture()
def _no_proxy(monkeypatch):
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)


def test_a_file_that_changes_while_a_download_resumes_fails_its_checksum(tmp_path, _no_proxy):
    from dataset_fixtures import serve, sha256

    from affectlens.data.download import ChecksumError, DownloadError, download, part_path

    old, new = os.urandom(2_500_000), os.urandom(2_500_000)
    with serve({"/a.bin": old}) as srv:
        srv.drop_after["/a.bin"] = 1_000_000
        with pytest.raises(DownloadError, match=r"download failed after 1 attempts.*next run resumes"):
            download(f"{srv.url}/a.bin", tmp_path / "a.bin", sha256=sha256(old), retries=0)
        assert part_path(tmp_path / "a.bin").stat().st_size == 1_000_000
        srv.files["/a.bin"] = new  # the server now has other bytes: the resumed file is a mix
        with pytest.raises(ChecksumError) as e:
            download(f"{srv.url}/a.bin", tmp_path / "a.bin", sha256=sha256(old), backoff=0.01)
        assert srv.requests[-1] == ("/a.bin", "bytes=1000000-")
    mixed = sha256(old[:1_000_000] + new[1_000_000:])
    assert str(e.value).startswith(f"{tmp_path / 'a.bin'}: checksum mismatch") and sha256(old) in str(e.value)
    assert mixed in str(e.value)
    assert list(tmp_path.iterdir()) == []


class _FullDisk:
    """A file object whose writes fail with ENOSPC once the disk's `budget` ([bytes left], shared
    by every file opened on it) is spent."""

    def __init__(self, f, budget):
        self.f, self.budget = f, budget

    def write(self, b):
        if len(b) > self.budget[0]:
            self.f.write(b[: self.budget[0]])
            self.budget[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget[0] -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_during_a_download_stops_at_once_and_the_next_run_resumes(tmp_path, monkeypatch, _no_proxy):
    import builtins

    import affectlens.data.download as dl
    from dataset_fixtures import serve, sha256

    payload = os.urandom(3_000_000)
    disk = [1_500_000]
    monkeypatch.setattr(dl, "open", lambda p, mode="r", *a, **k: _FullDisk(builtins.open(p, mode, *a, **k), disk)
                        if "b" in mode and ("w" in mode or "a" in mode) else builtins.open(p, mode, *a, **k),
                        raising=False)
    dest = tmp_path / "a.bin"
    with serve({"/a.bin": payload}) as srv:
        with pytest.raises(dl.DownloadError, match=r"a\.bin\.part: No space left on device \(errno ENOSPC\); free "
                                                   r"space .* resumes from it"):
            dl.download(f"{srv.url}/a.bin", dest, sha256=sha256(payload), backoff=5.0)
        assert len(srv.requests) == 1  # not retried: the disk, not the network, failed
        assert not dest.exists() and dl.part_path(dest).stat().st_size == 1_500_000
        monkeypatch.undo()
        dl.download(f"{srv.url}/a.bin", dest, sha256=sha256(payload))
        assert srv.requests[-1] == ("/a.bin", "bytes=1500000-")
    assert dest.read_bytes() == payload


def test_disk_full_during_extraction_is_not_called_a_corrupt_archive(tmp_path, monkeypatch):
    import builtins

    import affectlens.data.archive as ar
    from dataset_fixtures import tar_bytes

    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_bytes({"d/x.bin": os.urandom(300_000), "d/y.bin": os.urandom(300_000)}))
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    disk = [400_000]
    monkeypatch.setattr(ar, "open", lambda p, mode="r", *a, **k: _FullDisk(builtins.open(p, mode, *a, **k), disk)
                        if mode == "wb" else builtins.open(p, mode, *a, **k), raising=False)
    with pytest.raises(ar.ArchiveError) as e:
        ar.extract(archive, target)
    assert "No space left on device (errno ENOSPC); free space" in str(e.value) and "corrupt" not in str(e.value)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "target"]  # no staging folder left


# --- scale: a merge of many chunks -------------------------------------------------------------------

def test_merging_many_chunks_holds_one_part_open_at_a_time(tmp_path, monkeypatch):
    """Shards of a large extraction are merged: 100k clips in 64-clip shards make ~1600 parts. Holding
    them all open cost ~0.7 MiB of HDF5 chunk cache each (344 MiB for 512 parts, measured) and one
    file descriptor each (past `ulimit -n` 1024 the merge failed); now one part is open at a time."""
    from affectlens.store import StoreWriter, merge_stores, write_store

    sites = {"encoder.embed": 8, "encoder.blocks.0.resid_post": 8}
    ids = [f"c{i}" for i in range(120)]
    parts = []
    for a in range(0, 120, 3):
        with write_store(tmp_path / f"{a:04d}.h5", sites, ids[a:a + 3],
                         {"clip_range": [a, a + 3], "n_clips_total": 120}, "float32") as w:
            w.append({s: [np.full((4 + i, 8), a + i, np.float32) for i in range(3)] for s in sites})
        parts.append(tmp_path / f"{a:04d}.h5")
    base = len(os.listdir("/proc/self/fd"))
    seen = []
    real = StoreWriter.append_rows

    def count(self, *a, **k):
        seen.append(len(os.listdir("/proc/self/fd")) - base)
        return real(self, *a, **k)

    monkeypatch.setattr(StoreWriter, "append_rows", count)
    merge_stores(parts, tmp_path / "out.h5", require_all=True)
    assert len(seen) == 40 and max(seen) <= 2  # the output and one part
    with Store(tmp_path / "out.h5") as s:
        assert s.clip_ids == ids
        np.testing.assert_array_equal(s.clip_frames("encoder.embed", 118), np.full((5, 8), 118, np.float32))
