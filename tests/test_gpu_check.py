"""bench/gpu_check.sh on the CPU (`--device cpu`): a pack of a tiny random-init Whisper (the
layout `gpu_check.py pack` writes) and a planted corpus in its real layout, float32 against
bfloat16; the tables it writes hold every site, both runs and every stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
EMOTIONS = ["neutral", "happy", "sad", "angry"]


def write_pack(pack: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(d_model=32, encoder_layers=4, encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
                        decoder_attention_heads=2, decoder_ffn_dim=64, vocab_size=128, num_mel_bins=80,
                        max_source_positions=1500, max_target_positions=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=1, decoder_start_token_id=1)
    torch.manual_seed(0)
    encoder = WhisperForConditionalGeneration(cfg).get_encoder().state_dict()
    pack.mkdir(parents=True)
    save_file({k: v.half().contiguous() for k, v in encoder.items()}, str(pack / "whisper-tiny-en.safetensors"),
              metadata={"config": cfg.to_json_string(), "revision": "tiny-random", "source": "test"})
    folder = pack / "demo"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    t = np.arange(int(1.2 * 16000)) / 16000
    for s in range(4):
        for sentence in range(2):
            for e, emotion in enumerate(EMOTIONS):
                f0 = 110 * (1 + 0.15 * s) * (1 + 0.4 * e)  # planted: pitch by emotion, shifted by speaker
                wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3)) * 0.2
                wave = (wave + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
                clip_id = f"spk{s}_s{sentence}_{emotion}"
                sf.write(folder / f"{clip_id}.flac", wave, 16000, subtype="PCM_16")
                rows.append({"clip_id": clip_id, "path": f"{clip_id}.flac", "label": emotion, "speaker": f"spk{s}",
                             "pair_key": f"spk{s}_s{sentence}"})
    pd.DataFrame(rows).to_csv(folder / "manifest.tsv", sep="\t", index=False)


@pytest.mark.slow
def test_gpu_check_runs_on_cpu(tmp_path):
    write_pack(tmp_path / "pack")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--dtypes", "float32,bfloat16", "--cases", "default",
                           "--pairs", "1", "--repeats", "1", "--tile", "2", "--pack", str(tmp_path / "pack"),
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sites = ["encoder.embed"] + [f"encoder.blocks.{i}.resid_post" for i in range(4)]

    agree = pd.read_csv(out / "agreement.tsv", sep="\t")
    assert sorted(agree["site"]) == sorted(sites)
    assert set(agree["run"]) == {"cpu-bfloat16"} and set(agree["reference"]) == {"cpu-float32"}
    assert (agree["frames"] == 32 * 60).all()  # 32 clips x 1.2 s at 50 frames/s: real frames only
    assert (agree["cosine_mean"] > 0.99).all() and (agree["rel_error"] < 0.1).all()
    assert (agree["rel_error"] > 0).all()  # bfloat16 is not float32: the comparison sees the difference

    probes = pd.read_csv(out / "probes.tsv", sep="\t")
    assert len(probes) == 2 * len(sites) * 2  # runs x sites x (macro_f1, accuracy)
    assert probes["value"].between(0, 1).all()

    patch = pd.read_csv(out / "patch.tsv", sep="\t").iloc[0]
    assert patch["cells"] == 2 * len(sites) * 3  # directions x sites x 0.5 s windows over 1.2 s
    assert np.isfinite(patch["max_abs_diff"])

    tp = pd.read_csv(out / "throughput.tsv", sep="\t")
    for run in ("cpu-float32", "cpu-bfloat16"):
        stages = set(tp.loc[tp["run"] == run, "stage"])
        assert stages == {"extract", "extract x2", "prepare x2", "probe_sweep", "patch"}
    assert (tp["seconds"] > 0).all()
    assert "Stored activations against float32" in (out / "summary.md").read_text()


def test_gpu_check_refuses_a_missing_cuda_device(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "run", "--device", "cuda",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "sees no CUDA device; use --device cpu" in proc.stderr
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == "[]"  # nothing written
