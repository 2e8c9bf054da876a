"""Dataset sources end to end on fixtures laid out exactly as the published corpora: downloaded from
a loopback HTTP server, verified, extracted, indexed, checked and decoded by the workflow's own
stage functions; MELD's adapter also against the real annotation tables when they are present."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml
from dataset_fixtures import (build_deam, build_meld_raw, build_pmemo, crema_d_repo, meld_csv, serve, tone,
                              wav_bytes, write_json, write_media, write_wav, zip_tree)
from snakemake.utils import validate

from affectlens import stages
from affectlens.config import check_config
from affectlens.data import crema_d, meld
from affectlens.data.annotations import AnnotationError, speaker_split
from affectlens.data.decode import decode_clip, decode_manifest
from affectlens.data.download import ChecksumError
from affectlens.data.manifest import read_manifest, read_rejections, safe_clip_id
from affectlens.data.sources import MODULES, module
from affectlens.data.video import decode_frames, sample_frames

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
MELD_REAL = Path(os.environ.get("AFFECTLENS_MELD_DIR", REPO.parent / "shared" / "data" / "meld"))


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)


FIRST_UTTERANCE = "also I was the point person on my company’s transition from the KL-5 to GR-6 system."
TOP_LEVEL = ("label_column", "download_dir", "clip_check", "min_duration", "max_duration", "max_duration_mismatch",
             "check_jobs", "video")


def dataset_config(tmp_path: Path, source: str, **settings) -> dict:
    """The dataset's config block as the workflow sees it: validated, defaults filled by the schema."""
    top = {k: settings.pop(k) for k in list(settings) if k in TOP_LEVEL}
    cfg = {"datasets": {"d": {"source": source, "download_dir": str(tmp_path / "download"), "check_jobs": 2,
                              **top, source: settings}},
           "models": {"m": {"family": "whisper", "source": "x", "sites": ["encoder.embed"]}},
           "studies": {"s": {"datasets": ["d"], "models": ["m"]}}}
    validate(cfg, str(SCHEMA))
    return cfg["datasets"]["d"]


def run_stages(tmp_path: Path, name: str, cfg: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    raw = tmp_path / "resources" / "raw" / name
    out = tmp_path / "results" / "manifest"
    stages.data.raw(name, cfg, raw)
    stages.data.manifest(raw, name, cfg, out / f"{name}.tsv", out / f"{name}.rejected.tsv")
    return read_manifest(out / f"{name}.tsv"), read_rejections(out / f"{name}.rejected.tsv")


def reasons(rejected: pd.DataFrame) -> dict[str, str]:
    return dict(zip(rejected["clip_id"], rejected["reason"]))


# --- MELD -------------------------------------------------------------------------------------------

def _meld_fixture(tmp_path: Path) -> bytes:
    def mp4(seconds: float, seed: int, amp: float = 0.3) -> bytes:
        x = tone(seconds, 16000, 200 + 40 * seed, amp, seed)
        return write_media(tmp_path / "clips" / f"{seed}.mp4", x).read_bytes()

    train_rows = [
        dict(dia=0, utt=0, text=FIRST_UTTERANCE, speaker="Chandler", emotion="neutral", sentiment="neutral"),
        dict(dia=0, utt=1, text="You must’ve had your hands full.", speaker="The Interviewer", emotion="surprise",
             sentiment="positive"),
        dict(dia=1, utt=0, text="Well, I just wanted to see where you lived.", speaker="Richard’s Date",
             emotion="joy", sentiment="positive"),
        dict(dia=1, utt=1, text="Oh…", speaker="Ross", emotion="sadness", sentiment="negative"),
        dict(dia=2, utt=0, text="No!", speaker="Rachel", emotion="anger", sentiment="negative"),
        dict(dia=3, utt=0, text="Where is my clip?", speaker="Joey", emotion="fear", sentiment="negative"),
        dict(dia=4, utt=0, text="Ew.", speaker="Monica", emotion="disgust", sentiment="negative"),
    ]
    clips = {
        "train": {"dia0_utt0.mp4": mp4(2.0, 1), "dia0_utt1.mp4": mp4(1.5, 2),
                  "dia1_utt0.mp4": mp4(2.0, 3, amp=0.0),            # silent
                  "dia1_utt1.mp4": os.urandom(3000),               # corrupt
                  "dia2_utt0.mp4": mp4(5.0, 4),                     # mis-cut: 5 s for a 2 s utterance
                  "dia4_utt0.mp4": mp4(2.0, 5),
                  "dia9_utt9.mp4": mp4(2.0, 6)},                    # no annotation row
        "dev": {"dia0_utt0.mp4": mp4(2.0, 7)},
        "test": {"dia0_utt0.mp4": mp4(2.0, 8), "final_videos_testdia0_utt0.mp4": mp4(2.0, 9)},
    }
    tables = {"train": meld_csv(train_rows),
              "dev": meld_csv([dict(dia=0, utt=0, text="Hi.", speaker="Phoebe", emotion="joy", sentiment="positive")]),
              "test": meld_csv([dict(dia=0, utt=0, text="Bye.", speaker="Joey", emotion="neutral",
                                     sentiment="neutral")])}
    return build_meld_raw(tmp_path, clips, tables)


def test_meld_download_extract_manifest_and_decode(tmp_path):
    tarball = _meld_fixture(tmp_path)
    with serve({"/MELD.Raw.tar.gz": tarball}) as srv:
        srv.drop_after["/MELD.Raw.tar.gz"] = len(tarball) // 3  # the transfer breaks once and resumes
        cfg = dataset_config(tmp_path, "meld", url=f"{srv.url}/MELD.Raw.tar.gz")
        m, rejected = run_stages(tmp_path, "meld", cfg)
        assert [r for _, r in srv.requests][:2] == [None, f"bytes={len(tarball) // 3}-"]
    assert m["clip_id"].tolist() == ["train_dia0_utt0", "train_dia0_utt1", "train_dia4_utt0", "dev_dia0_utt0",
                                     "test_dia0_utt0"]
    row = m.set_index("clip_id").loc["train_dia0_utt0"]
    assert row["text"] == FIRST_UTTERANCE
    assert (row["label"], row["speaker"], row["split"], row["sentiment"]) == ("neutral", "Chandler", "train", "neutral")
    assert m["pair_key"].isna().all() and abs(row["duration"] - 2.0) < 0.1
    assert m.set_index("clip_id").loc["train_dia0_utt1", "speaker"] == "The Interviewer"
    why = reasons(rejected)
    assert why["train_dia1_utt0"].startswith("silent")
    assert "not decodable" in why["train_dia1_utt1"]
    assert why["train_dia2_utt0"].startswith("mis-cut") and "2.00 s" in why["train_dia2_utt0"]
    assert why["train_dia3_utt0"].startswith("annotation without a clip: no dia3_utt0.mp4 in train_splits/")
    assert why["train_dia9_utt9"].startswith("clip without an annotation row")
    assert "not a MELD clip" in why["test_final_videos_testdia0_utt0"]
    # the sha256 of what was fetched is recorded beside the tarball (none is published)
    side = json.loads((tmp_path / "download" / "meld" / "MELD.Raw.tar.gz.sha256.json").read_text())
    assert side["verified"] == "recorded" and side["size"] == len(tarball)
    # decode: MP4 video clips -> 16 kHz mono FLAC, in parallel
    decoded, bad = decode_manifest(m, tmp_path / "decoded", n_jobs=2, progress=False)
    assert bad == [] and len(decoded) == len(m)
    info = sf.info(decoded["path"].iloc[0])
    assert (info.samplerate, info.channels) == (16000, 1)


def test_meld_adapter_on_the_real_annotation_tables():
    if not all((MELD_REAL / f"{s}_sent_emo.csv").is_file() for s in meld.SPLITS):
        pytest.skip(f"real MELD tables not present in {MELD_REAL}")
    t = meld.annotation_table({s: MELD_REAL / f"{s}_sent_emo.csv" for s in meld.SPLITS}, "meld")
    assert t.groupby("split").size().to_dict() == {"train": 9989, "dev": 1109, "test": 2610}
    counts = t.groupby(["split", "label"]).size().unstack(fill_value=0)
    assert counts.loc["train"].to_dict() == {"anger": 1109, "disgust": 271, "fear": 268, "joy": 1743,
                                             "neutral": 4710, "sadness": 683, "surprise": 1205}
    assert counts.loc["dev"].to_dict() == {"anger": 153, "disgust": 22, "fear": 40, "joy": 163, "neutral": 470,
                                           "sadness": 111, "surprise": 150}
    assert counts.loc["test"].to_dict() == {"anger": 345, "disgust": 68, "fear": 50, "joy": 402, "neutral": 1256,
                                            "sadness": 208, "surprise": 281}
    first = t.iloc[0]
    assert first["clip_id"] == "train_dia0_utt0" and first["speaker"] == "Chandler"
    assert first["text"] == FIRST_UTTERANCE
    assert abs(first["annotated_duration"] - (21.731 - 16.059)) < 1e-6
    assert "Richard’s Date" in set(t["speaker"]) and t["clip_id"].is_unique
    assert t["text"].str.contains("…").sum() > 100  # published punctuation kept, decoded as UTF-8


def test_meld_table_errors_name_file_and_column(tmp_path):
    good = meld_csv([dict(dia=0, utt=0, text="Hi.", speaker="Joey", emotion="joy", sentiment="positive")])
    text = good.decode()
    (tmp_path / "train_sent_emo.csv").write_text(text.replace("Speaker,", "Talker,", 1))
    with pytest.raises(AnnotationError, match=r"train_sent_emo\.csv: missing required column\(s\) \['Speaker'\]"):
        meld.read_annotations(tmp_path / "train_sent_emo.csv")
    (tmp_path / "dev_sent_emo.csv").write_text(text.replace(",joy,", ",elated,"))
    with pytest.raises(AnnotationError,
                       match=r"dev_sent_emo\.csv: column 'Emotion' has unknown value\(s\) \['elated'\]"):
        meld.read_annotations(tmp_path / "dev_sent_emo.csv")
    # a table saved as Windows-1252 is still read, its text decoded correctly
    (tmp_path / "test_sent_emo.csv").write_bytes(good.replace(b"Hi.", "It’s me.".encode("cp1252")))
    assert meld.read_annotations(tmp_path / "test_sent_emo.csv")["Utterance"].tolist() == ["It’s me."]


# --- CREMA-D ----------------------------------------------------------------------------------------

ACTORS = {str(a): ("Male" if a % 2 else "Female") for a in range(1001, 1011)}


def _crema_d_audio() -> tuple[list[str], dict[str, bytes]]:
    names, audio = [], {}
    for i, actor in enumerate(ACTORS):
        for j, (sentence, emotion, level) in enumerate((("IEO", "HAP", "HI"), ("IEO", "SAD", "LO"),
                                                        ("DFA", "ANG", "XX"))):
            name = f"{actor}_{sentence}_{emotion}_{level}"
            names.append(name)
            audio[name] = wav_bytes(tone(0.6, 16000, 150 + 10 * i + 30 * j, seed=i * 3 + j))
    audio["1001_DFA_ANG_XX"] = wav_bytes(np.zeros(0, np.float32))  # header only, like 1076_MTI_SAD_XX
    names.append("1002_TSI_NEU_XX")  # listed, but the server has no such file
    return names, audio


def test_crema_d_verified_against_lfs_pointers_with_speaker_disjoint_split(tmp_path):
    names, audio = _crema_d_audio()
    with serve(crema_d_repo(names, audio, ACTORS)) as srv:
        cfg = dataset_config(tmp_path, "crema_d", repo_url=f"{srv.url}/raw", media_url=f"{srv.url}/media",
                             test_fraction=0.2, dev_fraction=0.2, download_jobs=4)
        m, rejected = run_stages(tmp_path, "crema_d", cfg)
    assert len(m) == 29 and set(m["label"]) == {"happy", "sad", "angry"}
    row = m.set_index("clip_id").loc["1003_IEO_SAD_LO"]
    assert (row["speaker"], row["pair_key"], row["text"], row["intensity"], row["sex"]) == \
        ("1003", "1003_IEO", "It's eleven o'clock.", "low", "Male")
    assert m.groupby("pair_key")["label"].nunique().max() == 2  # IEO in two emotions: counterfactual pairs
    assert m.groupby("speaker")["split"].nunique().eq(1).all()  # speaker-disjoint
    per_split = m.drop_duplicates("speaker").groupby(["split", "sex"]).size().to_dict()
    assert per_split == {("dev", "Female"): 1, ("dev", "Male"): 1, ("test", "Female"): 1, ("test", "Male"): 1,
                         ("train", "Female"): 3, ("train", "Male"): 3}
    why = reasons(rejected)
    assert why["1001_DFA_ANG_XX"].startswith("empty")
    assert why["1002_TSI_NEU_XX"].startswith("download failed") and "HTTP 404" in why["1002_TSI_NEU_XX"]
    table = pd.read_csv(tmp_path / "resources/raw/crema_d/checksums.tsv", sep="\t")
    assert len(table) == 30  # one published digest per WAV, from its LFS pointer


def test_crema_d_checksum_mismatch_stops_and_names_the_file(tmp_path):
    names, audio = _crema_d_audio()
    files = crema_d_repo(names, audio, ACTORS)
    files["/media/AudioWAV/1005_IEO_HAP_HI.wav"] = wav_bytes(tone(0.6, 16000, 999))  # not what the pointer says
    with serve(files) as srv:
        cfg = dataset_config(tmp_path, "crema_d", repo_url=f"{srv.url}/raw", media_url=f"{srv.url}/media")
        with pytest.raises(ChecksumError, match=r"1005_IEO_HAP_HI\.wav: checksum mismatch.*"
                                                r"expected sha256 [0-9a-f]{64}, got [0-9a-f]{64}"):
            stages.data.raw("crema_d", cfg, tmp_path / "raw")
    assert not (tmp_path / "download/crema_d/AudioWAV/1005_IEO_HAP_HI.wav").exists()


def test_crema_d_local_copy_unknown_code_and_lfs_pointer(tmp_path):
    clone = tmp_path / "CREMA-D" / "AudioWAV"
    write_wav(clone / "1001_IEO_HAP_HI.wav", tone(0.6))
    (clone / "1002_IEO_HAP_HI.wav").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:"
                                               + "a" * 64 + "\nsize 12345\n")
    cfg = dataset_config(tmp_path, "crema_d", root=str(tmp_path / "CREMA-D"))
    m, rejected = run_stages(tmp_path, "crema_d", cfg)
    assert m["clip_id"].tolist() == ["1001_IEO_HAP_HI"]
    assert "Git LFS pointer" in reasons(rejected)["1002_IEO_HAP_HI"]
    pointers = clone.parent / "pointers"
    pointers.mkdir()
    (pointers / "1002_IEO_HAP_HI.wav").write_bytes((clone / "1002_IEO_HAP_HI.wav").read_bytes())
    table = crema_d.checksums_from_lfs_clone(pointers, tmp_path / "checksums.tsv")
    assert table["1002_IEO_HAP_HI.wav"].sha256 == "a" * 64 and table["1002_IEO_HAP_HI.wav"].size == 12345
    write_wav(clone / "1003_IEO_XYZ_HI.wav", tone(0.6))
    with pytest.raises(AnnotationError, match=r"1003_IEO_XYZ_HI\.wav: unknown emotion code 'XYZ'.*field emotion"):
        crema_d.build_manifest(tmp_path / "resources/raw/crema_d", "crema_d", crema_d.Options())


def test_speaker_split_is_stable_when_speakers_are_added():
    a = speaker_split([f"s{i}" for i in range(20)], 0.2, 0.1, seed=0)
    b = speaker_split([f"s{i}" for i in range(21)], 0.2, 0.1, seed=0)
    assert sum(v == "test" for v in a.values()) == 4 and sum(v == "dev" for v in a.values()) == 2
    assert sum(a[s] != b[s] for s in a) <= 2


# --- PMEmo and DEAM ---------------------------------------------------------------------------------

def _songs(ids, dynamic_len=8):
    rng = np.random.default_rng(0)
    return {sid: {"artist": f"Artist {sid % 3}", "seconds": 1.5, "valence": round(float(v), 3),
                  "arousal": round(float(a), 3), "dynamic": [tuple(np.round(rng.uniform(0, 1, 2), 3))
                                                             for _ in range(dynamic_len)]}
            for sid, v, a in zip(ids, [0.8, 0.2, 0.6, 0.3, 0.9], [0.7, 0.3, 0.2, 0.9, 0.5])}


def test_pmemo_from_zip_over_http(tmp_path):
    songs = _songs([1, 4, 7, 10])
    songs[10]["audio"] = False
    build_pmemo(tmp_path / "src", songs, extra_meta=[13])
    data = zip_tree(tmp_path / "src" / "PMEmo2019")
    with serve({"/PMEmo2019.zip": data}) as srv:
        cfg = dataset_config(tmp_path, "pmemo", url=f"{srv.url}/PMEmo2019.zip")
        m, rejected = run_stages(tmp_path, "pmemo", cfg)
    assert m["clip_id"].tolist() == ["pmemo_1", "pmemo_4", "pmemo_7"]
    assert m["label"].tolist() == ["HVHA", "LVLA", "HVLA"]
    assert m["speaker"].tolist() == ["Artist 1", "Artist 1", "Artist 1"] and set(m["split"]) == {"all"}
    assert m["valence"].tolist() == [0.8, 0.2, 0.6] and m["valence_std"].tolist() == [0.12] * 3
    why = reasons(rejected)
    assert why["pmemo_10"].startswith("rating without a chorus file") and "without a static rating" in why["pmemo_13"]


def test_pmemo_segments_take_labels_from_the_dynamic_ratings(tmp_path):
    from affectlens.data import pmemo

    songs = _songs([1, 2], dynamic_len=8)  # 8 ratings at 2 Hz from 15 s: 15.0 ... 18.5
    songs[1]["dynamic"] = [(0.9, 0.1)] * 4 + [(0.1, 0.9)] * 4
    build_pmemo(tmp_path / "raw", songs)
    opts = pmemo.Options(label="valence", segment_s=2.0)
    m, _ = pmemo.build_manifest(tmp_path / "raw", "pmemo", opts)
    one = m[m["music_id"] == "1"]
    assert one["start"].tolist() == [15.0, 17.0] and one["end"].tolist() == [17.0, 19.0]
    assert one["label"].tolist() == ["low_valence", "high_valence"] and one["arousal"].tolist() == [0.9, 0.1]
    assert one["song_valence"].tolist() == [0.8, 0.8]


def test_deam_two_archives_static_and_dynamic(tmp_path):
    songs = _songs([10, 20, 2001, 30], dynamic_len=6)
    for sid, (v, a) in zip(songs, [(7.5, 6.0), (3.0, 2.5), (5.0, 8.0), (4.0, 4.0)]):
        songs[sid].update(valence=v, arousal=a)
    songs[30]["audio"] = False
    audio_dir, ann_dir = build_deam(tmp_path / "src", songs)
    files = {"/DEAM_audio.zip": zip_tree(audio_dir, arcroot=""), "/DEAM_Annotations.zip": zip_tree(ann_dir, arcroot="")}
    with serve(files) as srv:
        cfg = dataset_config(tmp_path, "deam", audio_url=f"{srv.url}/DEAM_audio.zip",
                             annotations_url=f"{srv.url}/DEAM_Annotations.zip", label="arousal")
        m, rejected = run_stages(tmp_path, "deam", cfg)
    assert m["clip_id"].tolist() == ["deam_10", "deam_20", "deam_2001"]
    assert m["split"].tolist() == ["train", "train", "test"]
    assert m["label"].tolist() == ["high_arousal", "low_arousal", "high_arousal"]
    assert reasons(rejected)["deam_30"].startswith("rating without audio")
    from affectlens.data import deam

    seg, _ = deam.build_manifest(tmp_path / "resources/raw/deam", "deam", deam.Options(segment_s=1.0))
    assert len(seg) == 3 * 3 and seg["start"].tolist()[:3] == [15.0, 16.0, 17.0]


# --- folder and video QA ----------------------------------------------------------------------------

def test_folder_of_labelled_recordings(tmp_path):
    rec = tmp_path / "recordings"
    for i, rel in enumerate(["happy/anna_1.wav", "happy/ben_1.wav", "sad/anna_2.wav", "sad/deeper/ben_2.flac"]):
        write_wav(rec / rel, tone(0.8, 16000, 180 + 20 * i, seed=i))
    write_wav(rec / "sad/quiet_3.wav", np.zeros(16000, np.float32))
    cfg = dataset_config(tmp_path, "folder", root=str(rec), labels=["happy", "sad"],
                         pattern="^[^/]+/(?:[^/]+/)*(?P<speaker>[^_/]+)_")
    m, rejected = run_stages(tmp_path, "folder", cfg)
    assert sorted(zip(m["source_clip_id"], m["label"], m["speaker"])) == [  # clip_id: made safe as a file name
        ("happy/anna_1", "happy", "anna"), ("happy/ben_1", "happy", "ben"), ("sad/anna_2", "sad", "anna"),
        ("sad/deeper/ben_2", "sad", "ben")]
    assert m["clip_id"].str.fullmatch(r"[a-z]+_[a-z_]+_\d-[0-9a-f]{8}").all()
    assert reasons(rejected)[safe_clip_id("sad/quiet_3")].startswith("silent")
    write_wav(rec / "angry/anna_4.wav", tone(0.8))
    with pytest.raises(AnnotationError, match=r"recordings/angry: folder 'angry' is not a known label"):
        run_stages(tmp_path, "folder", cfg)


def test_folder_csv_layout_and_missing_column(tmp_path):
    rec = tmp_path / "rec"
    write_wav(rec / "a.wav", tone(0.8))
    write_wav(rec / "b.wav", tone(0.8, freq=300))
    (tmp_path / "labels.csv").write_text("path,label,speaker,valence\na.wav,calm,s1,0.2\nb.wav,angry,s2,0.9\n")
    cfg = dataset_config(tmp_path, "folder", root=str(rec), csv=str(tmp_path / "labels.csv"))
    m, _ = run_stages(tmp_path, "folder", cfg)
    assert m[["clip_id", "label", "speaker", "valence"]].values.tolist() == [["a", "calm", "s1", 0.2],
                                                                           ["b", "angry", "s2", 0.9]]
    (tmp_path / "bad.csv").write_text("file,emotion\na.wav,calm\n")
    cfg = dataset_config(tmp_path, "folder", root=str(rec), csv=str(tmp_path / "bad.csv"))
    with pytest.raises(AnnotationError, match=r"bad\.csv: missing required column\(s\) \['path', 'label'\]"):
        run_stages(tmp_path, "folder", cfg)


def test_video_qa_manifest_and_frame_sampling(tmp_path):
    videos = tmp_path / "videos"
    write_media(videos / "v1.mp4", tone(2.0), fps=10, size=(48, 32))
    write_media(videos / "v2.webm", tone(1.0), 48000 // 3, vcodec="libvpx", acodec="libopus", size=(32, 32))
    write_media(videos / "mute.mp4", tone(1.0), acodec=None)
    ann = [{"video_name": "v1.mp4", "question": "What happens?", "candidates": ["a", "b"], "answer": "a",
            "answer_number": 0, "question_id": "q1", "task_name": "count", "start": 0.5, "end": 1.5,
            "frames_with_answer_object": [3, 4]},
           {"video_name": "v2", "question": "Is it loud?", "answer": "no", "question_id": "q2"},
           {"video_name": "mute.mp4", "question": "Silent film?"},
           {"video_name": "gone.mp4", "question": "Where?", "question_id": "q4"}]
    write_json(tmp_path / "ann.json", ann)
    cfg = dataset_config(tmp_path, "video_qa", annotations=str(tmp_path / "ann.json"), videos=str(videos))
    m, rejected = run_stages(tmp_path, "videoqa", cfg)
    assert m["clip_id"].tolist() == ["q1", "q2", "q000002"]
    q1 = m.set_index("clip_id").loc["q1"]
    assert (q1["text"], q1["label"], q1["speaker"], q1["start"], q1["end"]) == ("What happens?", "a", "v1", 0.5, 1.5)
    assert json.loads(q1["candidates"]) == ["a", "b"] and abs(q1["duration"] - 1.0) < 1e-6
    assert reasons(rejected)["q4"].startswith("question without a video")
    frames, times = sample_frames(videos / "v1.mp4", frame_rate=4.0, start=0.5, end=1.5, size=24)
    assert frames.shape == (4, 16, 24, 3) and frames.dtype == np.uint8
    assert np.allclose(times, [0.5, 0.75, 1.0, 1.25], atol=0.051)
    out, bad = decode_frames(m, tmp_path / "frames", frame_rate=2.0, max_frames=2, size=16, n_jobs=2)
    assert bad == [] and out["n_frames"].tolist() == [2, 2, 2]
    assert np.load(out["frames_path"].iloc[0])["frames"].shape == (2, 11, 16, 3)
    write_json(tmp_path / "bad.json", [{"video_name": "v1.mp4"}])
    cfg = dataset_config(tmp_path, "video_qa", annotations=str(tmp_path / "bad.json"), videos=str(videos))
    with pytest.raises(AnnotationError, match=r"annotations\.json: entry 0 lacks required key\(s\) \['question'\]"):
        run_stages(tmp_path, "bad", cfg)


def test_opus_and_mp3_decode_without_system_ffmpeg(tmp_path):
    x = tone(1.0, 48000, 300)
    write_media(tmp_path / "a.ogg", x, 48000, video=False, acodec="libopus")
    write_media(tmp_path / "a.mp3", x, 48000, video=False, acodec="libmp3lame")
    for name in ("a.ogg", "a.mp3"):
        y = decode_clip(tmp_path / name, 0.25, 0.75)
        assert abs(len(y) - 8000) <= 2 and 0.15 < float(np.sqrt(np.mean(y ** 2))) < 0.3


# --- config -----------------------------------------------------------------------------------------

def test_schema_defaults_match_each_sources_options():
    schema = yaml.safe_load(SCHEMA.read_text())["properties"]["datasets"]["additionalProperties"]["properties"]
    for source in MODULES:
        block = schema[source]["properties"]
        fields = {f.name: f for f in dataclasses.fields(module(source).Options)}
        assert set(block) == set(fields), source
        for name, f in fields.items():
            default = f.default
            default = list(default) if isinstance(default, tuple) else default
            assert block[name]["default"] == default, f"{source}.{name}"
            assert block[name]["description"], f"{source}.{name}"


STUDIES = sorted((REPO / "config" / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_example_studies_are_valid_configs(path):
    cfg = yaml.safe_load(path.read_text())
    validate(cfg, str(SCHEMA))
    check_config(cfg)
    for name, d in cfg["datasets"].items():
        if d["source"] != "demo":
            from affectlens.data.sources import source_options

            source_options(name, d)


@pytest.mark.workflow
@pytest.mark.parametrize("study", ["crema_d", "video_qa"])
def test_example_study_dry_runs(tmp_path, study):
    from test_studies import placeholder_data

    placeholder_data(REPO / "config" / "studies" / f"{study}.yaml", tmp_path)  # the files the config check reads
    cmd = [sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "-s", str(REPO / "Snakefile"),
           "--directory", str(tmp_path), "--configfile", str(REPO / "config" / "studies" / f"{study}.yaml"),
           "--cores", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "raw" in out.stdout and "manifest" in out.stdout
