"""URDU: the download of the authors' repository archive, the published file naming and folders,
a local folder, and the real 400 clips in ../shared when present."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from affectlens.data import sources
from affectlens.data.annotations import AnnotationError
from affectlens.data.download import ChecksumError
from dataset_fixtures import serve, tone, write_wav, zip_tree

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "urdu"
FOLDERS = {"A": "Angry", "H": "Happy", "N": "Neutral", "S": "Sad"}
NAMES = ["SM1_F1_A01", "SM1_F2_H01", "SF3_F1_H02", "SF3_F2_S01", "SM12_F1_N01", "SM12_F2_S02", "SM4_F1_A02",
         "SM4_F2_N02"]


def urdu_tree(root: Path, names=NAMES, suffix: str = ".wav") -> Path:
    """The published layout: one folder per emotion (Angry/, ...), WAV files named SGX_FYY_EZZ."""
    for i, name in enumerate(names):
        write_wav(root / FOLDERS[name.split("_")[2][0]] / f"{name}{suffix}", tone(0.5, freq=180 + 15 * i, seed=i),
                  sr=44100)
    return root


def fetch_and_build(tmp_path, cfg):
    dataset_cfg = {"source": "urdu", "download_dir": str(tmp_path / "dl"), "urdu": cfg}
    raw = tmp_path / "raw"
    sources.fetch(raw, "urdu", dataset_cfg)
    return sources.build(raw, "urdu", dataset_cfg)


def test_download_of_the_repository_archive_indexes_the_published_names(tmp_path):
    archive = zip_tree(urdu_tree(tmp_path / "URDU-Dataset-master"))  # GitHub's archive: one top folder
    with serve({"/archive/master.zip": archive}) as server:
        manifest, rejected = fetch_and_build(tmp_path, {"url": server.url + "/archive/master.zip",
                                                        "sha256": hashlib.sha256(archive).hexdigest()})
    assert rejected == [] and len(manifest) == len(NAMES)
    row = manifest.set_index("clip_id").loc["SM12_F2_S02"]
    assert (row.label, row.speaker, row.sex, row.file_number) == ("sad", "SM12", "male", 2)
    assert manifest.set_index("clip_id").loc["SF3_F1_H02"].speaker == "SF3"
    assert manifest.pair_key.isna().all()  # not a parallel corpus
    assert (manifest.groupby("speaker").split.nunique() == 1).all()
    assert sorted(manifest.label.unique()) == ["angry", "happy", "neutral", "sad"]


def test_a_pinned_digest_that_does_not_match_stops(tmp_path):
    archive = zip_tree(urdu_tree(tmp_path / "URDU-Dataset-master", NAMES[:2]))
    with serve({"/a.zip": archive}) as server, pytest.raises(ChecksumError):
        fetch_and_build(tmp_path, {"url": server.url + "/a.zip", "sha256": "0" * 64})


def test_a_local_folder_of_flac_with_a_subset_of_emotions(tmp_path):
    root = urdu_tree(tmp_path / "urdu", suffix=".flac")
    manifest, _ = fetch_and_build(tmp_path, {"root": str(root), "emotions": ["angry", "sad"]})
    assert sorted(manifest.label.unique()) == ["angry", "sad"] and len(manifest) == 4
    assert sources.known_labels("urdu", {"source": "urdu", "urdu": {"root": str(root)}}) == (
        "angry", "happy", "neutral", "sad")


@pytest.mark.parametrize("name, folder, match", [
    ("SM1 take 3", "Angry", r"SM1 take 3.*SGX_FYY_EZZ"),
    ("SM1_F9_X01", "Angry", r"unknown emotion letter 'X'"),
    ("SM1_F9_H09", "Angry", r"name says happy but the clip is in the Angry/ folder"),
])
def test_a_misnamed_or_misfiled_clip_is_named_in_the_error(tmp_path, name, folder, match):
    root = urdu_tree(tmp_path / "urdu", NAMES[:2])
    write_wav(root / folder / f"{name}.wav", np.zeros(800, np.float32))
    with pytest.raises(AnnotationError, match=match):
        fetch_and_build(tmp_path, {"root": str(root)})


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")
def test_the_real_corpus(tmp_path):
    manifest, rejected = fetch_and_build(tmp_path, {"root": str(SHARED)})
    assert len(manifest) == 400 and rejected == []
    assert manifest.label.value_counts().to_dict() == {e: 100 for e in ("angry", "happy", "neutral", "sad")}
    assert manifest.speaker.nunique() == 29 and manifest.speaker.value_counts().max() == 80
    # most speakers say a single emotion: what per-speaker normalisation and axes have to work with
    assert (manifest.groupby("speaker").label.nunique() == 1).sum() == 26
