"""Extraction: storage dtypes (bfloat16 bit-exact), resuming after a kill, shards and their
verified merge, and the attributes that pin a store to its model revision."""

from __future__ import annotations

import json
import os
import shutil
import signal

import h5py
import numpy as np
import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

from affectlens.extract import extract_store, shard_range
from affectlens.models.speech import SpeechEncoderAdapter
from affectlens.store import _open_left_behind, IncompleteStoreError, MergeError, Store, from_storage, merge_stores, to_storage
from test_adapters_common import manifest_of

torch.set_num_threads(1)
SITES = ["encoder.embed", "encoder.blocks.*.resid_post", "encoder.blocks.1.mlp_out"]


def tiny_adapter(dtype=torch.float32, revision="r1") -> SpeechEncoderAdapter:
    torch.manual_seed(0)
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                            conv_dim=(8,) * 7, num_conv_pos_embedding_groups=2, num_conv_pos_embeddings=8)
    return SpeechEncoderAdapter(Wav2Vec2Model(config).eval().to(dtype), "tiny-w2v", revision)


@pytest.fixture(scope="module")
def clips():
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in rng.integers(1_000, 9_000, size=11)]


def run(adapter, clips, out, **kw):
    manifest, lookup = manifest_of(clips)
    kw = {"batch_size": 3, "chunk_clips": 4, "progress": False, **kw}
    return extract_store(manifest, adapter, SITES, out, load_wave=kw.pop("load_wave", lookup.__getitem__), **kw)


def contents(path):
    with Store(path) as s:
        return ({site: np.concatenate(list(s.frame_chunks(site))) for site in s.sites},
                {site: s.pooled(site) for site in s.sites}, s.clip_ids, s.n_frames.tolist())


def assert_same_store(a, b):
    fa, pa, ia, na = contents(a)
    fb, pb, ib, nb = contents(b)
    assert ia == ib and na == nb and fa.keys() == fb.keys()
    for site in fa:
        np.testing.assert_array_equal(fa[site], fb[site], err_msg=site)
        np.testing.assert_array_equal(pa[site], pb[site], err_msg=site)


# --- storage dtypes ---------------------------------------------------------------------------
def test_bfloat16_conversion_matches_torch_rounding_and_round_trips():
    x = np.random.default_rng(0).standard_normal((257, 33)).astype(np.float32) * 10.0 ** np.arange(-3, 30, 1)
    x[0, :4] = [np.inf, -np.inf, 0.0, -0.0]
    want = torch.from_numpy(x).to(torch.bfloat16)
    bits = to_storage(x, "bfloat16")
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(bits, want.view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(from_storage(bits, "bfloat16"), want.float().numpy())
    assert np.isnan(from_storage(to_storage(np.array([np.nan], np.float32), "bfloat16"), "bfloat16")).all()


def test_a_bfloat16_model_is_stored_bit_exactly(clips, tmp_path):
    adapter = tiny_adapter(torch.bfloat16)
    out = run(adapter, clips[:5], tmp_path / "bf16.h5", storage_dtype="bfloat16")
    with Store(out) as s:
        assert s.attrs["storage_dtype"] == "bfloat16" and s.attrs["model_dtype"] == "bfloat16"
        assert s.h5["sites/encoder.embed/frames"].dtype == np.uint16
        for clip in range(5):
            batch = adapter.prepare([clips[clip]])
            _, cache = adapter.run(batch, capture=s.sites)
            for site in s.sites:
                want = cache[site][0].float().numpy()
                np.testing.assert_array_equal(s.clip_frames(site, clip), want, err_msg=f"{site} clip {clip}")


def test_float16_default_is_the_float32_activation_rounded(clips, tmp_path):
    adapter = tiny_adapter()
    f32 = run(adapter, clips[:4], tmp_path / "f32.h5", storage_dtype="float32")
    f16 = run(adapter, clips[:4], tmp_path / "f16.h5")
    (a, pa, *_), (b, pb, *_) = contents(f32), contents(f16)
    for site in a:
        np.testing.assert_array_equal(a[site].astype(np.float16).astype(np.float32), b[site])
        np.testing.assert_array_equal(pa[site].astype(np.float16).astype(np.float32), pb[site])


# --- resuming -----------------------------------------------------------------------------------
def test_an_interrupted_extraction_resumes_from_the_last_chunk_to_the_same_store(clips, tmp_path):
    adapter = tiny_adapter()
    whole = run(adapter, clips, tmp_path / "whole.h5")
    _, lookup = manifest_of(clips)
    loaded = []

    def crash_at_clip_9(path):
        if path == "clip9":
            raise RuntimeError("killed")
        loaded.append(path)
        return lookup[path]

    out = tmp_path / "resumed.h5"
    with pytest.raises(RuntimeError, match="killed"):
        run(adapter, clips, out, load_wave=crash_at_clip_9)
    parts = out.with_name(out.name + ".parts")
    assert not out.exists() and sorted(p.name for p in parts.iterdir()) == ["store.h5"]
    assert clips_written(parts / "store.h5") == 8  # two chunks of 4 committed
    with pytest.raises(IncompleteStoreError):  # the growing store never reads as finished
        Store(parts / "store.h5")
    # what an older version left, and a resume cut short: removed
    (parts / "000000008-000000011.h5.partial").write_bytes(b"\x89HDF half")
    (parts / "store.h5.resumed").write_bytes(b"\x89HDF half")
    loaded.clear()

    def count(path):
        loaded.append(path)
        return lookup[path]
    run(adapter, clips, out, load_wave=count)
    assert loaded == ["clip8", "clip9", "clip10"]  # only the unfinished chunk was computed again
    assert not parts.exists()
    assert_same_store(whole, out)


def clips_written(path) -> int:
    """The clips a growing store has committed (what a rerun resumes after)."""
    with _open_left_behind(path) as f:
        return int(f.attrs["clips_written"])


def _extract_until_killed_at_clip_6(out):
    """Child of the kill test (spawned: a fork of a process that ran torch threads can hang)."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in rng.integers(1_000, 9_000, size=11)]
    _, lookup = manifest_of(clips)

    def die_at_clip_6(path):
        if path == "clip6":
            os.kill(os.getpid(), signal.SIGKILL)
        return lookup[path]

    run(tiny_adapter(), clips, out, load_wave=die_at_clip_6)


def test_a_killed_process_resumes_and_corrupt_chunks_are_redone(clips, tmp_path):
    """A real SIGKILL in a child process mid-extraction, then a chunk file truncated as a crash in
    the middle of its rename could leave it: the rerun yields the uninterrupted store."""
    import multiprocessing

    adapter = tiny_adapter()
    whole = run(adapter, clips, tmp_path / "whole.h5")
    out = tmp_path / "killed.h5"
    child = multiprocessing.get_context("spawn").Process(target=_extract_until_killed_at_clip_6, args=(out,))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL
    growing = out.with_name(out.name + ".parts") / "store.h5"
    assert clips_written(growing) == 4 and not out.exists()
    resumed = tmp_path / "resumed.h5"  # a copy resumes from clip 4
    shutil.copytree(out.with_name(out.name + ".parts"), resumed.with_name(resumed.name + ".parts"))
    _, lookup = manifest_of(clips)
    loaded = []
    run(adapter, clips, resumed, load_wave=lambda p: loaded.append(p) or lookup[p])
    assert loaded == [f"clip{i}" for i in range(4, 11)]
    assert_same_store(whole, resumed)
    growing.write_bytes(growing.read_bytes()[:3000])  # corrupt: must be recomputed, never used
    run(adapter, clips, out)
    assert_same_store(whole, out)


def test_chunks_made_with_other_settings_are_redone(clips, tmp_path):
    out = tmp_path / "s.h5"
    _, lookup = manifest_of(clips)
    with pytest.raises(RuntimeError):
        run(tiny_adapter(revision="old"), clips, out, load_wave=lambda p: (_ for _ in ()).throw(RuntimeError())
            if p == "clip5" else lookup[p])
    loaded = []
    run(tiny_adapter(revision="new"), clips, out, load_wave=lambda p: loaded.append(p) or lookup[p])
    assert len(loaded) == len(clips)
    with Store(out) as s:
        assert s.attrs["revision"] == "new"


# --- shards ---------------------------------------------------------------------------------------
def test_shards_merge_into_the_unsharded_store(clips, tmp_path):
    # one clip per forward pass: a shard boundary changes which clips share a padded batch, and a
    # padded batch is not bitwise the same computation as another; the merge itself must be exact
    adapter = tiny_adapter()
    whole = run(adapter, clips, tmp_path / "whole.h5", config={"k": 1}, batch_size=1)
    ranges = [shard_range(len(clips), i, 3) for i in range(3)]
    assert ranges == [(0, 4), (4, 7), (7, 11)]
    shards = [run(adapter, clips, tmp_path / f"shard{i}.h5", clip_range=r, config={"k": 1}, batch_size=1)
              for i, r in enumerate(ranges)]
    with Store(shards[1]) as s:
        assert s.clip_ids == ["clip4", "clip5", "clip6"] and json.loads(s.attrs["clip_range"]) == [4, 7]
    merged = merge_stores(shards[::-1], tmp_path / "merged.h5", require_all=True, block_rows=10)
    assert_same_store(whole, merged)
    with Store(merged) as s, Store(whole) as w:
        for key in ("revision", "config_digest", "clip_ids_digest", "n_clips_total", "clip_range"):
            assert s.attrs[key] == w.attrs[key], key
        p = s.positions_of("encoder", 5)
        np.testing.assert_array_equal(p.time, w.positions_of("encoder", 5).time)


def test_merge_refuses_overlaps_gaps_missing_shards_and_mismatched_settings(clips, tmp_path):
    adapter = tiny_adapter()
    a = run(adapter, clips, tmp_path / "a.h5", clip_range=(0, 4))
    b = run(adapter, clips, tmp_path / "b.h5", clip_range=(3, 7))
    c = run(adapter, clips, tmp_path / "c.h5", clip_range=(7, 11))
    d = run(adapter, clips, tmp_path / "d.h5", clip_range=(4, 7), storage_dtype="float32")
    e = run(tiny_adapter(revision="r2"), clips, tmp_path / "e.h5", clip_range=(4, 7))
    f = run(adapter, clips[:10], tmp_path / "f.h5", clip_range=(4, 7))  # another manifest
    out = tmp_path / "m.h5"
    with pytest.raises(MergeError, match="overlap"):
        merge_stores([a, b], out)
    with pytest.raises(MergeError, match=r"clips \[4, 7\) are in none"):
        merge_stores([a, c], out)
    with pytest.raises(MergeError, match="storage_dtype"):
        merge_stores([a, d, c], out)
    with pytest.raises(MergeError, match="revision"):
        merge_stores([a, e, c], out)
    with pytest.raises(MergeError, match="n_clips_total"):
        merge_stores([a, f], out)
    with pytest.raises(MergeError, match="shard is missing"):
        merge_stores([a], out, require_all=True)
    assert not out.exists() and not out.with_name("m.h5.partial").exists()


def test_merge_checks_what_it_wrote(clips, tmp_path, monkeypatch):
    adapter = tiny_adapter()
    a = run(adapter, clips, tmp_path / "a.h5", clip_range=(0, 5))
    b = run(adapter, clips, tmp_path / "b.h5", clip_range=(5, 11))
    import affectlens.store as store_module

    real = store_module.StoreWriter.append_rows

    def corrupt(self, n_frames, rows, pooled, positions=None):
        rows = {k: v.copy() for k, v in rows.items()}
        rows["encoder.embed"][0] += 1
        return real(self, n_frames, rows, pooled, positions)

    monkeypatch.setattr(store_module.StoreWriter, "append_rows", corrupt)
    with pytest.raises(MergeError, match="differ"):
        merge_stores([a, b], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


def test_old_single_tower_stores_still_read(tmp_path):
    path = tmp_path / "v1.h5"
    with h5py.File(path, "w") as f:  # the layout before towers and positions
        f.create_dataset("clip_ids", data=np.array(["a", "b"], dtype=object), dtype=h5py.string_dtype())
        f["n_frames"], f["offsets"] = np.array([2, 1]), np.array([0, 2, 3])
        f["sites/encoder.embed/pooled"] = np.ones((2, 3), np.float16)
        f["sites/encoder.embed/frames"] = np.arange(9, dtype=np.float16).reshape(3, 3)
        f.attrs.update(sites=json.dumps(["encoder.embed"]), storage_dtype="float16", complete=True)
    with Store(path) as s:
        np.testing.assert_array_equal(s.clip_frames("encoder.embed", 1), [[6, 7, 8]])
        assert s.offsets_of("encoder.embed").tolist() == [0, 2, 3]


def test_spans_pool_by_kind_and_positions_survive_the_store(tmp_path):
    from affectlens.models.positions import Positions
    from affectlens.store import write_store

    rng = np.random.default_rng(0)
    frames = [rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(2, 3)).astype(np.float32)]
    kinds = [["text", "audio", "audio", "audio", "text"], ["text", "text"]]
    pos = [Positions(np.arange(len(k)), k, [np.nan, 0.0, 0.04, 0.08, np.nan][:len(k)], [-1] * len(k),
                     ["<s>", "", "", "", "hi"][:len(k)]) for k in kinds]
    with write_store(tmp_path / "s.h5", {"thinker.embed": 3}, ["a", "b"], {}, "float32") as w:
        w.append({"thinker.embed": frames}, positions={"thinker": pos})
    with Store(tmp_path / "s.h5") as s:
        audio = s.pooled("thinker.embed", kind="audio")
        np.testing.assert_allclose(audio[0], frames[0][1:4].mean(0), rtol=1e-6)
        assert np.isnan(audio[1]).all()  # no audio in clip b
        p = s.positions_of("thinker", 0)
        assert p.kind.tolist() == kinds[0] and p.token.tolist() == ["<s>", "", "", "", "hi"]
        assert p.spans() == [("text", 0, 1), ("audio", 1, 4), ("text", 4, 5)]


# --- generated towers (Qwen-Omni's Talker: one generation run per clip) -------------------------
def test_talker_extraction_resumes_from_the_last_chunk_to_the_same_store(monkeypatch, tmp_path):
    """Talker sites are generated clip by clip beside the batched Thinker forward; a run killed
    after its first chunks redoes only the rest, and the merged store equals the uninterrupted one."""
    from test_adapters_qwen_omni import clips as omni_clips
    from test_adapters_qwen_omni import speaking

    adapter = speaking("qwen2.5-omni", monkeypatch)
    data = omni_clips()
    manifest, lookup = manifest_of(data)
    sites = ["thinker.blocks.0.resid_post", "talker.embed", "talker.blocks.1.mlp_out"]
    kw = {"batch_size": 2, "chunk_clips": 2, "storage_dtype": "float32", "progress": False}
    whole = extract_store(manifest, adapter, sites, tmp_path / "whole.h5", load_clip=lambda r: lookup[r["clip_id"]],
                          **kw)
    spoken = []
    generated_rows = adapter.generated_rows

    def counted(clip, sites):
        spoken.append(next(k for k, v in lookup.items() if v is clip))
        return generated_rows(clip, sites)

    monkeypatch.setattr(adapter, "generated_rows", counted)

    def crash_at_clip_2(row):
        if row["clip_id"] == "clip2":
            raise RuntimeError("killed")
        return lookup[row["clip_id"]]

    out = tmp_path / "resumed.h5"
    with pytest.raises(RuntimeError, match="killed"):
        extract_store(manifest, adapter, sites, out, load_clip=crash_at_clip_2, **kw)
    assert spoken == ["clip0", "clip1"]
    spoken.clear()
    extract_store(manifest, adapter, sites, out, load_clip=lambda r: lookup[r["clip_id"]], **kw)
    assert spoken == ["clip2"]  # only the unfinished chunk was spoken again
    assert_same_store(whole, out)
    with Store(whole) as a, Store(out) as b:
        for clip in range(len(data)):
            assert a.positions_of("talker", clip).token.tolist() == b.positions_of("talker", clip).token.tolist()


def test_the_allocator_setting_takes_effect_where_there_is_glibc(clips, tmp_path, monkeypatch):
    """`keep_freed_memory` reaches glibc's mallopt here (elsewhere it says no), and CPU extraction
    calls it."""
    import ctypes.util
    import platform

    import affectlens.extract as extract

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and ctypes.util.find_library("c")
    assert extract.keep_freed_memory() is bool(glibc)
    calls = []
    monkeypatch.setattr(extract, "keep_freed_memory", lambda: calls.append(1) or True)
    run(tiny_adapter(), clips, tmp_path / "s.h5")
    assert calls == [1]
