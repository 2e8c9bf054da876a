"""Does temporal context help the steering stage's mel mapper?

The hear-site -> log-mel mapper (`affectlens.steering.inversion.MelMapper`) reads each activation
frame with `context` frames on either side. With context c, `ridge` is a linear temporal convolution
of width 2c+1 and `mlp` a two-layer temporal conv net (width 2c+1, then 1x1), so this bench is the
"small temporal conv" question: it fits each kind at several widths on the clips of some actors and
reports the log-mel L1 on the clips of held-out actors (the error `inversion_quality.tsv` calls
mapper_log_mel_l1), beside the clip-independent floor of predicting the training corpus's mean mel.

    python bench/bench_mapper.py --store results/extract/ravdess/whisper-tiny-en.h5 \
        --manifest results/manifest/ravdess.tsv --site encoder.blocks.3.resid_post
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from affectlens.data.decode import decode_clip
from affectlens.probes.sweep import align_manifest
from affectlens.steering.inversion import MelMapper
from affectlens.store import Store


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--site", required=True, help="the hear site the mapper reads")
    ap.add_argument("--train-actors", type=int, default=8, help="speakers to fit on (the first N sorted)")
    ap.add_argument("--test-actors", type=int, default=4, help="held-out speakers (the last N sorted)")
    ap.add_argument("--contexts", default="0,2,4", help="frames of context on either side")
    ap.add_argument("--kinds", default="ridge,mlp")
    ap.add_argument("--sr", type=int, default=16000)
    args = ap.parse_args(argv)

    manifest = pd.read_csv(args.manifest, sep="\t", dtype={"clip_id": str})
    speakers = sorted(manifest["speaker"].astype(str).unique())
    train_spk, test_spk = speakers[:args.train_actors], speakers[-args.test_actors:]
    if set(train_spk) & set(test_spk):
        raise SystemExit(f"{len(speakers)} speakers: too few for {args.train_actors} + {args.test_actors} disjoint")
    manifest = manifest[manifest["speaker"].isin(train_spk + test_spk)].reset_index(drop=True)
    with Store(args.store) as store:
        rows = align_manifest(store.clip_ids, manifest, ["speaker"], where=args.store)
        frames = [store.clip_frames(args.site, r) for r in rows]
    waves = [decode_clip(p, sr=args.sr) for p in manifest["path"]]
    is_test = manifest["speaker"].isin(test_spk).to_numpy()
    tr = [i for i in range(len(frames)) if not is_test[i]]
    te = [i for i in range(len(frames)) if is_test[i]]
    targets = MelMapper().targets(frames, waves, sr=args.sr)  # context does not change the targets
    mean_mel = np.concatenate([targets[i] for i in tr]).mean(0)
    floor = float(np.mean(np.concatenate([np.abs(targets[i] - mean_mel) for i in te])))
    print(f"{args.site}: {len(tr)} training clips of {len(train_spk)} speakers, {len(te)} held-out clips of "
          f"{len(test_spk)} speakers, {sum(len(frames[i]) for i in tr)} training frames")
    print(f"log-mel L1 of the training mean mel on held-out clips (no activations): {floor:.4f}")
    print("kind\tcontext\twidth\theld-out log-mel L1\tvs mean mel\tfit s")
    for kind in args.kinds.split(","):
        for c in (int(x) for x in args.contexts.split(",")):
            t0 = time.perf_counter()
            m = MelMapper(kind=kind, context=c).fit_targets([frames[i] for i in tr], [targets[i] for i in tr])
            fit_s = time.perf_counter() - t0
            err = float(np.mean(np.concatenate(
                [np.abs(m.predict(frames[i]).reshape(len(frames[i]), -1) - targets[i]) for i in te])))
            print(f"{kind}\t{c}\t{2 * c + 1}\t{err:.4f}\t{err / floor:.3f}\t{fit_s:.1f}", flush=True)


if __name__ == "__main__":
    main()
