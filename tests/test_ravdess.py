"""RAVDESS: the Zenodo download (record metadata -> archive -> published MD5), the published
file naming, a local folder, and the real 1440 clips in ../shared when present."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from affectlens.data import sources
from affectlens.data.annotations import AnnotationError
from affectlens.data.download import ChecksumError
from dataset_fixtures import serve, tone, write_wav, zip_tree

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ravdess"
NAMES = [f"03-01-{emo}-{inten}-{st}-{rep}-{actor}" for actor in ("01", "02", "03", "04")
         for emo, inten in (("01", "01"), ("03", "01"), ("03", "02"), ("04", "02")) for st in ("01", "02")
         for rep in ("01",)]


def actor_tree(root: Path, names=NAMES) -> Path:
    for i, name in enumerate(names):
        write_wav(root / f"Actor_{name[-2:]}" / f"{name}.wav", tone(0.5, freq=200 + 10 * i, seed=i), sr=48000)
    return root


def zenodo(server_url: str, archive: bytes, md5: str | None = None) -> dict[str, bytes]:
    content = "/api/records/1188976/files/Audio_Speech_Actors_01-24.zip/content"
    meta = {"id": 1188976, "files": [
        {"key": "Audio_Speech_Actors_01-24.zip", "size": len(archive),
         "checksum": f"md5:{md5 or hashlib.md5(archive).hexdigest()}", "links": {"self": server_url + content}},
        {"key": "Video_Speech_Actor_01.zip", "size": 1, "checksum": "md5:0", "links": {"self": server_url + "/x"}}]}
    return {"/api/records/1188976": json.dumps(meta).encode(), content: archive}


def fetch_and_build(tmp_path, cfg):
    dataset_cfg = {"source": "ravdess", "download_dir": str(tmp_path / "dl"), "ravdess": cfg}
    raw = tmp_path / "raw"
    sources.fetch(raw, "rav", dataset_cfg)
    return sources.build(raw, "rav", dataset_cfg)


def test_download_verifies_the_published_md5_and_indexes_the_published_names(tmp_path):
    archive = zip_tree(actor_tree(tmp_path / "src"), arcroot="")
    with serve({}) as server:
        server.files.update(zenodo(server.url, archive))
        manifest, rejected = fetch_and_build(tmp_path, {"api_url": server.url + "/api"})
    assert rejected == [] and len(manifest) == len(NAMES)
    row = manifest.set_index("clip_id").loc["03-01-03-02-02-01-03"]
    assert (row.label, row.speaker, row.intensity, row.sex, row.text) == (
        "happy", "actor03", "strong", "male", "Dogs are sitting by the door")
    assert row.pair_key == "actor03_s02_i02_r01"
    # the pair key names the same actor, words, take and intensity: happy and sad strong share one
    shared = manifest[manifest.pair_key == "actor03_s02_i02_r01"].label.tolist()
    assert sorted(shared) == ["happy", "sad"]
    # speaker-disjoint split, one split per actor
    assert (manifest.groupby("speaker").split.nunique() == 1).all()


def test_an_md5_mismatch_stops_naming_the_file_and_both_digests(tmp_path):
    archive = zip_tree(actor_tree(tmp_path / "src"), arcroot="")
    with serve({}) as server:
        server.files.update(zenodo(server.url, archive, md5="0" * 32))
        with pytest.raises(ChecksumError, match=r"Audio_Speech_Actors_01-24\.zip.*md5 [0-9a-f]{32}.*publishes 0{32}"):
            fetch_and_build(tmp_path, {"api_url": server.url + "/api"})
    assert not (tmp_path / "dl" / "rav" / "Audio_Speech_Actors_01-24.zip").exists()
    assert not (tmp_path / "raw" / "audio").exists()


def test_a_local_folder_with_subsets_of_actors_and_emotions(tmp_path):
    root = actor_tree(tmp_path / "ravdess", NAMES + ["01-01-03-01-01-01-01"])  # a video file name: skipped
    manifest, _ = fetch_and_build(tmp_path, {"root": str(root), "actors": [1, 2], "emotions": ["sad", "happy"]})
    assert sorted(manifest.speaker.unique()) == ["actor01", "actor02"]
    assert sorted(manifest.label.unique()) == ["happy", "sad"] and len(manifest) == 12


def test_a_file_that_is_not_a_ravdess_name_is_named_in_the_error(tmp_path):
    root = actor_tree(tmp_path / "ravdess", NAMES[:2])
    write_wav(root / "Actor_01" / "take 3.wav", np.zeros(100, np.float32))
    with pytest.raises(AnnotationError, match=r"take 3\.wav.*MM-VV-EE-II-SS-RR-AA"):
        fetch_and_build(tmp_path, {"root": str(root)})


def test_config_rejects_an_actor_outside_the_corpus(tmp_path):
    with pytest.raises(ValueError, match=r"ravdess\.actors: \[25\]"):
        fetch_and_build(tmp_path, {"root": str(tmp_path), "actors": [1, 25]})


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")
def test_the_real_corpus(tmp_path):
    manifest, rejected = fetch_and_build(tmp_path, {"root": str(SHARED)})
    assert len(manifest) == 1440 and rejected == []
    assert manifest.speaker.nunique() == 24
    counts = manifest.label.value_counts().to_dict()
    assert counts == {"neutral": 96, **{e: 192 for e in ("calm", "happy", "sad", "angry", "fearful", "disgust",
                                                           "surprised")}}
    # parallel corpus: every normal-intensity key has all 8 emotions, every strong key the 7 but neutral
    per_key = manifest.groupby("pair_key").label.nunique()
    assert set(per_key[per_key.index.str.contains("_i01_")]) == {8}
    assert set(per_key[per_key.index.str.contains("_i02_")]) == {7}
    split_actors = manifest.groupby("split").speaker.nunique().to_dict()
    assert split_actors == {"test": 4, "dev": 2, "train": 18}
    assert (manifest.groupby(["split", "sex"]).speaker.nunique().unstack() > 0).all().all()
