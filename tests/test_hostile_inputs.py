"""A user's own data, at its worst (issue 20): ids that are paths, audio that would be clipped,
rows cut outside their file, links and loops in the folder, truncated files, names that are not
text, and runs where nothing survives. Each either becomes a safe clip, or a rejection naming the
file and the reason; nothing is written outside the output folders."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from snakemake.utils import validate

from affectlens import stages
from affectlens.data import decode
from affectlens.data.manifest import (MAX_CLIP_ID, is_safe_clip_id, read_manifest, read_rejections, safe_clip_id,
                                      validate_manifest, write_manifest)
from affectlens.naming import parse_steered_wav_name, steered_wav_name

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def tone(seconds, sr=16000, freq=220.0, amp=0.3):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def folder_cfg(**folder) -> dict:
    cfg = {"datasets": {"d": {"source": "folder", "folder": folder}},
           "models": {"m": {"family": "whisper", "source": "x", "sites": ["encoder.embed"]}},
           "studies": {"s": {"datasets": ["d"], "models": ["m"]}}}
    validate(cfg, str(SCHEMA))
    return cfg["datasets"]["d"]


def run(cfg, decode_too=False):
    """raw -> manifest (-> decode) in the working directory, as the workflow lays them out."""
    stages.data.raw("d", cfg, Path("resources/raw/d"))
    stages.data.manifest(Path("resources/raw/d"), "d", cfg, Path("results/manifest/d.tsv"),
                         Path("results/manifest/d.rejected.tsv"), kept_rejected=Path("logs/manifest/d.rejected.tsv"))
    m, rejected = read_manifest("results/manifest/d.tsv"), read_rejections("results/manifest/d.rejected.tsv")
    if decode_too:
        stages.data.decode(Path("results/manifest/d.tsv"), cfg, Path("results/decode/d/audio"),
                           Path("results/decode/d/frames"), Path("results/decode/d/manifest.tsv"),
                           Path("results/decode/d/rejected.tsv"), kept_rejected=Path("logs/decode/d.rejected.tsv"))
    return m, rejected


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (links not followed) and its content (a link: its target)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in files + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            p = os.path.join(d, name)
            rel = os.path.relpath(p, root)
            out[rel] = os.readlink(p).encode() if os.path.islink(p) else Path(p).read_bytes()
    return out


# --- 1. clip ids ------------------------------------------------------------------------------------

HOSTILE = ["/etc/passwd", "../x", "..", ".", ".hidden", "a/b", "a\\b", "C:\\x", "a\nb", "a\x00b", "a\tb", "ünï cødé",
           "x" * 300, "a__m-sae__alpha1", "-rf", "a b", "x" * MAX_CLIP_ID]


@pytest.mark.parametrize("clip_id", HOSTILE)
def test_any_clip_id_becomes_a_plain_file_stem_with_a_stable_digest(clip_id):
    safe = safe_clip_id(clip_id)
    assert is_safe_clip_id(safe) and safe_clip_id(safe) == safe and Path(safe).name == safe
    assert safe_clip_id(clip_id) == safe  # stable
    assert (safe == clip_id) == is_safe_clip_id(clip_id)
    name = steered_wav_name(safe, "pca", -1.5, seed=3)  # what the steer stage writes for it
    assert Path(name).name == name and ".." not in name.split("/") and len(name.encode()) < 255
    parsed = parse_steered_wav_name(name)
    assert (parsed.clip, parsed.method, parsed.seed) == (safe, "pca", 3)


def test_the_manifest_maps_unsafe_ids_keeps_the_originals_and_reads_back_the_same(tmp_path):
    ids = ["fine_1", *HOSTILE[:-1]]
    df = pd.DataFrame({"clip_id": ids, "dataset": "d", "path": "x.wav", "split": "all", "label": "a", "speaker": "s",
                       "pair_key": None, "text": None, "start": None, "end": None, "duration": None})
    m = validate_manifest(df)
    assert m["clip_id"].tolist() == [safe_clip_id(c) for c in ids] and m["clip_id"].is_unique
    assert m["source_clip_id"].isna().tolist() == [True] + [False] * (len(ids) - 1)
    assert m["source_clip_id"].tolist()[1:] == ids[1:]
    write_manifest(m, tmp_path / "m.tsv")
    back = read_manifest(tmp_path / "m.tsv")
    assert back["clip_id"].tolist() == m["clip_id"].tolist()
    assert back["source_clip_id"].tolist()[1:4] == ["/etc/passwd", "../x", ".."]


def test_hostile_paths_in_a_table_write_nothing_outside_the_output_folders(tmp_path, monkeypatch):
    """Ids from a table's paths: absolute, `..`, nested, unicode, very long, a leading dot. Raw,
    manifest and decode write under resources/, results/ and logs/ only; the user's folders are
    untouched; every decoded file is a plain name in the audio folder."""
    rec, elsewhere = tmp_path / "rec", tmp_path / "elsewhere"
    for i, rel in enumerate(["a/b.wav", "ünï cødé.wav", "x" * 200 + ".wav", ".hidden.wav", "plain.wav"]):
        (rec / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(rec / rel, tone(0.5, freq=200 + 30 * i), 16000)
    elsewhere.mkdir()
    sf.write(elsewhere / "abs.wav", tone(0.5, freq=500), 16000)
    sf.write(tmp_path / "outside.wav", tone(0.5, freq=600), 16000)
    paths = [str(elsewhere / "abs.wav"), "../outside.wav", "a/b.wav", "ünï cødé.wav", "x" * 200 + ".wav",
             ".hidden.wav", "plain.wav"]
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"{p},{'happy' if i % 2 else 'sad'}\n"
                                                                  for i, p in enumerate(paths)))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = tree(tmp_path)
    m, rejected = run(folder_cfg(root=str(rec), csv=str(tmp_path / "labels.csv")), decode_too=True)
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing the user had was changed
    new = sorted(set(after) - set(before))
    assert new and all(k.split(os.sep)[:2] in (["work", "results"], ["work", "resources"], ["work", "logs"])
                       for k in new), new
    assert len(rejected) == 0 and len(m) == len(paths)
    assert m["clip_id"].map(is_safe_clip_id).all() and m["clip_id"].tolist()[-1] == "plain"
    assert m["source_clip_id"].tolist()[:4] == [str(elsewhere / "abs"), "../outside", "a/b", "ünï cødé"]
    decoded = read_manifest("results/decode/d/manifest.tsv")
    audio = work / "results/decode/d/audio"
    assert sorted(p.name for p in audio.iterdir()) == sorted(f"{c}.flac" for c in m["clip_id"])
    assert all(Path(p).parent == audio for p in decoded["path"].map(lambda p: Path(p).resolve()))


# --- 2. no silent damage ----------------------------------------------------------------------------

def _row(clip_id, path, start=np.nan, end=np.nan):
    return {"clip_id": clip_id, "dataset": "d", "path": str(path), "split": "all", "label": "a", "speaker": "s",
            "pair_key": None, "text": "", "start": start, "end": end, "duration": np.nan}


def test_over_range_float_audio_is_peak_normalised_with_a_note_or_refused(tmp_path):
    x = 8.0 * tone(1.0, amp=1.0)  # peaks at +18 dBFS: clipping would make a square wave
    sf.write(tmp_path / "hot.wav", x, 16000, subtype="FLOAT")
    sf.write(tmp_path / "ok.wav", tone(1.0), 16000)
    df = pd.DataFrame([_row("hot", tmp_path / "hot.wav"), _row("ok", tmp_path / "ok.wav")])
    out, bad = decode.decode_manifest(df, tmp_path / "out", progress=False)
    assert bad == []
    y = sf.read(out.loc[out.clip_id == "hot", "path"].item(), dtype="float32")[0]
    np.testing.assert_allclose(y, x / 8.0, atol=1e-3)  # the shape kept, scaled to full scale
    notes = dict(zip(out["clip_id"], out["decode_note"]))
    assert "over range: peak 8" in notes["hot"] and "peak-normalised" in notes["hot"] and notes["ok"] == ""
    out, bad = decode.decode_manifest(df, tmp_path / "out2", progress=False, over_range_mode="reject")
    assert out["clip_id"].tolist() == ["ok"] and [r["clip_id"] for r in bad] == ["hot"]
    assert "over range: peak 8" in bad[0]["reason"] and "refused" in bad[0]["reason"]


def test_start_and_end_outside_the_file_are_rejected_naming_the_row(tmp_path, monkeypatch):
    rec = tmp_path / "rec"
    rec.mkdir()
    sf.write(rec / "x.wav", tone(0.8), 16000)
    rows = ["0.1,0.5", "-0.5,0.5", "0.6,0.3", "0.2,5.0", "2.0,3.0", "0.0,-1"]
    # one file, six windows: each row its own (hard-linked) name, so the ids are unique
    (tmp_path / "labels.csv").write_text("path,label,speaker,start,end\n" + "".join(
        f"x{i}.wav,happy,s{i},{r}\n" for i, r in enumerate(rows)))
    for i in range(len(rows)):
        os.link(rec / "x.wav", rec / f"x{i}.wav")
    monkeypatch.chdir(tmp_path)
    for check in ("decode", "header"):
        cfg = folder_cfg(root=str(rec), csv=str(tmp_path / "labels.csv"))
        cfg["clip_check"] = check
        m, rejected = run(cfg)
        assert m["clip_id"].tolist() == ["x0"], check
        why = dict(zip(rejected["clip_id"], rejected["reason"]))
        assert "labels.csv row 1: clip start -0.5 s is negative" in why["x1"]
        assert "labels.csv row 2: clip end 0.3 s is not after start 0.6 s" in why["x2"]
        assert "clip ends at 5.00 s but x3.wav is 0.80 s long" in why["x3"], (check, why["x3"])
        assert "clip starts at 2.00 s but x4.wav is 0.80 s long" in why["x4"], (check, why["x4"])
        assert "labels.csv row 5: clip end -1.0 s is not after the start of the file" in why["x5"]
    # and in the decode stage, for any manifest
    df = pd.DataFrame([_row(f"r{i}", rec / "x.wav", *map(float, r.split(","))) for i, r in enumerate(rows)])
    out, bad = decode.decode_manifest(df, tmp_path / "out", progress=False)
    assert out["clip_id"].tolist() == ["r0"] and [r["clip_id"] for r in bad] == ["r1", "r2", "r3", "r4", "r5"]


def test_links_in_the_folder_are_followed_once_per_real_file_and_never_in_loops(tmp_path, monkeypatch):
    rec = tmp_path / "rec"
    for rel in ("happy/a.wav", "sad/b.wav"):
        (rec / rel).parent.mkdir(parents=True, exist_ok=True)
    sf.write(rec / "happy/a.wav", tone(0.5), 16000)
    sf.write(rec / "sad/b.wav", tone(0.5, freq=300), 16000)
    (rec / "happy/loop").symlink_to(rec, target_is_directory=True)          # a loop back to the root
    (rec / "happy/self").symlink_to(rec / "happy", target_is_directory=True)  # and to its own folder
    (rec / "happy/again").symlink_to(rec / "sad", target_is_directory=True)   # a real folder, linked
    (rec / "sad/a_link.wav").symlink_to(rec / "happy/a.wav")                  # a file, linked
    os.link(rec / "sad/b.wav", rec / "sad/b_hard.wav")                         # a hard link
    outside = tmp_path / "outside"
    outside.mkdir()
    sf.write(outside / "c.wav", tone(0.5, freq=400), 16000)
    (rec / "sad/ext").symlink_to(outside, target_is_directory=True)           # followed: it is the only way there
    (outside / "back").symlink_to(rec, target_is_directory=True)              # and a loop from there
    monkeypatch.chdir(tmp_path)
    m, rejected = run(folder_cfg(root=str(rec)))
    assert sorted(zip(m["source_clip_id"], m["label"])) == [("happy/a", "happy"), ("sad/b", "sad"),
                                                             ("sad/ext/c", "sad")]
    why = dict(zip(rejected["clip_id"], rejected["reason"]))
    assert set(why) == {safe_clip_id("sad/a_link"), safe_clip_id("sad/b_hard")}
    assert "the same file as" in why[safe_clip_id("sad/a_link")] and "happy/a.wav" in why[safe_clip_id("sad/a_link")]


def test_a_file_shorter_than_its_header_says_is_rejected(tmp_path, monkeypatch):
    rec = tmp_path / "rec" / "happy"
    rec.mkdir(parents=True)
    sf.write(rec / "whole.wav", tone(1.0), 16000)
    data = (rec / "whole.wav").read_bytes()
    (rec / "cut.wav").write_bytes(data[: len(data) // 2])           # a copy stopped half way
    sf.write(rec / "wholef.flac", tone(1.0, freq=330), 16000)
    data = (rec / "wholef.flac").read_bytes()
    (rec / "cutf.flac").write_bytes(data[: len(data) // 2])
    monkeypatch.chdir(tmp_path)
    for check in ("decode", "header"):
        cfg = folder_cfg(root=str(tmp_path / "rec"))
        cfg["clip_check"] = check
        m, rejected = run(cfg)
        why = dict(zip(rejected["clip_id"], rejected["reason"]))
        assert "truncated: the header says the data chunk holds 32000 bytes but the file holds" \
            in why[safe_clip_id("happy/cut")], (check, why)
        assert safe_clip_id("happy/whole") in set(m["clip_id"])
        if check == "decode":
            assert safe_clip_id("happy/cutf") in why  # the FLAC cut half way does not decode whole
    out, bad = decode.decode_manifest(pd.DataFrame([_row("cut", rec / "cut.wav")]), tmp_path / "out", progress=False)
    assert out.empty and "truncated" in bad[0]["reason"]


def test_a_file_name_that_is_not_utf8_is_rejected_alone(tmp_path, monkeypatch):
    rec = tmp_path / "rec" / "happy"
    rec.mkdir(parents=True)
    sf.write(rec / "ok.wav", tone(0.5), 16000)
    try:  # Latin-1 bytes: not UTF-8
        Path(os.fsdecode(os.fsencode(rec) + b"/caf\xe9.wav")).write_bytes((rec / "ok.wav").read_bytes())
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    monkeypatch.chdir(tmp_path)
    m, rejected = run(folder_cfg(root=str(tmp_path / "rec")))
    assert m["source_clip_id"].tolist() == ["happy/ok"]
    assert rejected["source_clip_id"].tolist() == ["happy/caf\\xe9"]
    assert rejected["clip_id"].tolist() == [safe_clip_id("happy/caf\\xe9")]
    assert "not UTF-8" in rejected["reason"].item() and rejected["path"].item().endswith("caf\\xe9.wav")


# --- 3. reasons survive a failed job ----------------------------------------------------------------

def test_when_every_clip_is_rejected_the_reasons_are_in_the_log_and_a_kept_file(tmp_path, monkeypatch):
    rec = tmp_path / "rec" / "happy"
    rec.mkdir(parents=True)
    for i in range(3):
        sf.write(rec / f"quiet{i}.wav", np.zeros(8000, np.float32), 16000)
    monkeypatch.chdir(tmp_path)
    logging.getLogger().handlers.clear()
    with pytest.raises(ValueError, match=r"none of 3 clips is usable; the reasons are in logs/manifest/d\.rejected"
                                         r"\.tsv and the log"):
        with stages.logged("logs/manifest/d.log"):
            run(folder_cfg(root=str(tmp_path / "rec")))
    for out in ("results/manifest/d.tsv", "results/manifest/d.rejected.tsv"):
        Path(out).unlink(missing_ok=True)  # what Snakemake does to a failed job's outputs
    kept = read_rejections("logs/manifest/d.rejected.tsv")
    assert len(kept) == 3 and kept["reason"].str.startswith("silent").all()
    text = Path("logs/manifest/d.log").read_text()
    assert text.count("silent: loudest 50 ms") == 3 and "quiet0.wav" in text

    # the same for the decode stage: a manifest whose clips all fail to decode
    cfg = folder_cfg(root=str(tmp_path / "rec"))
    cfg["clip_check"] = "none"
    run(cfg)
    with pytest.raises(ValueError, match=r"none of its clips decodes; the reasons are in logs/decode/d\.rejected\.tsv"):
        with stages.logged("logs/decode/d.log"):
            run(cfg, decode_too=True)
    assert read_rejections("logs/decode/d.rejected.tsv")["reason"].str.startswith("silent").all()
    assert Path("logs/decode/d.log").read_text().count("silent: loudest 50 ms") == 3
