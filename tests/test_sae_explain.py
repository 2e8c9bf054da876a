"""Explaining SAE features: downstream fidelity of a spliced reconstruction (exact for a lossless
SAE, worse for zero-ablation), the user's concept from two folders of audio, peak frames, the
dashboard page, and the workflow's `sae` stage writing every artifact."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from affectlens import stages
from affectlens.models.whisper import WhisperAdapter
from affectlens.probes.linear import LinearProbe
from affectlens.sae import build
from affectlens.data.concepts import concept_clips
from affectlens.sae.concept import find_concept
from affectlens.sae.features import peak_frames, top_activating
from affectlens.sae.fidelity import output_head_for, splice_fidelity
from affectlens.store import Store, write_store
from affectlens.viz.dashboard import write_dashboard

SITE = "encoder.blocks.0.resid_post"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    """Two encoder blocks, d = 64, a 2 s window: a random Whisper that runs in milliseconds."""
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=96, d_model=64, max_source_positions=100, encoder_layers=2, decoder_layers=1,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, pad_token_id=0, bos_token_id=1, eos_token_id=0,
                           decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])
    return WhisperAdapter(WhisperForConditionalGeneration(config).eval(), "tiny-random")


def waves(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(16000) / 16000
    return [(0.3 * np.sin(2 * np.pi * (200 + 150 * (i % 2)) * t)
             + 0.05 * rng.standard_normal(len(t))).astype(np.float32) for i in range(n)]


def lossless_sae(d: int):
    """relu(x) - relu(-x) = x: a ReLU SAE with atoms +e_i and -e_i reconstructs exactly."""
    sae = build("relu", d_in=d, d_sae=2 * d, center_input=False, normalize_input=False, b_dec_init="zeros")
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.W_enc.copy_(torch.cat([eye, -eye]))
    return sae.eval()


def test_lossless_splice_keeps_everything_and_zero_ablation_does_not(tiny):
    w = waves(8)
    labels = np.array(["low", "high"] * 4)
    batch = tiny.prepare(w)
    _, cache = tiny.run(batch, capture=["encoder.blocks.1.resid_post"])
    pooled = torch.stack([cache["encoder.blocks.1.resid_post"][b, :n].mean(0) for b, n in enumerate(batch.n_frames)])
    probe = LinearProbe(C=10.0).fit(pooled.numpy(), labels)
    table = splice_fidelity(tiny, lossless_sae(64), SITE, w, labels, {"encoder.blocks.1.resid_post": probe},
                            output_head_for(tiny), batch_size=4).set_index("measure")
    assert table.loc["site_explained_variance", "spliced"] == pytest.approx(1.0, abs=1e-5)
    acc = table.loc["probe_accuracy:encoder.blocks.1.resid_post"]
    assert acc["clean"] == 1.0 and acc["spliced"] == 1.0
    kl = table.loc["output_kl"]
    assert kl["spliced"] == pytest.approx(0.0, abs=1e-5) and kl["zero"] > 1e-3
    assert kl["recovered"] == pytest.approx(1.0, abs=1e-3)
    assert set(table["n_clips"]) == {8}


def test_find_concept_from_two_folders(tiny, tmp_path):
    for i, wave in enumerate(waves(8)):
        folder = tmp_path / ("guitar" if i % 2 else "no_guitar")
        folder.mkdir(exist_ok=True)
        sf.write(folder / f"take{i}.wav", wave, 16000)
    sae = build("topk", d_in=64, expansion=2, k=8)
    sae.init_from_data(torch.randn(256, 64))
    (with_files, with_groups), (without_files, without_groups) = (concept_clips(tmp_path / "guitar"),
                                                                  concept_clips(tmp_path / "no_guitar"))
    concept = find_concept(sae.eval(), tiny, SITE, with_files, without_files, with_groups, without_groups, top_k=2,
                           n_splits=2, n_boot=50, n_permutations=99)
    assert len(concept.features) == 128 and concept.features["rank"].tolist() == list(range(128))
    assert (concept.clips["concept"] == "with").sum() == 4 and len(concept.clips) == 8 and concept.acts.shape == (8, 128)
    assert concept.probe["k"].tolist() == [1, 2] and concept.probe["accuracy"].between(0, 1).all()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no audio files"):
        concept_clips(tmp_path / "empty")


# -- a small store + manifest, as the workflow hands them to the stage ----------------------------

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("sae_study")
    rng = np.random.default_rng(0)
    d, n_clips = 16, 40
    atoms = rng.standard_normal((24, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    labels = np.array(["happy", "sad"] * (n_clips // 2))
    clips, rows = [], []
    for i in range(n_clips):
        n = int(rng.integers(20, 40))
        idx = rng.integers(1, 24, (n, 2))
        x = atoms[idx].sum(1)
        if labels[i] == "happy":
            x[n // 2] += 3 * atoms[0]   # a happy clip peaks on atom 0 at its middle frame
        clips.append(x.astype(np.float32))
        path = root / "audio" / f"c{i:02d}.flac"
        path.parent.mkdir(exist_ok=True)
        sf.write(path, np.zeros(320 * n, np.float32), 16000)
        rows.append({"clip_id": f"c{i:02d}", "dataset": "t", "path": str(path), "split": "", "label": labels[i],
                     "speaker": f"s{i % 5}", "pair_key": "", "text": "", "start": np.nan, "end": np.nan,
                     "duration": n / 50})
    store = root / "acts.h5"
    with write_store(store, {"encoder.blocks.0.resid_post": d, "encoder.blocks.1.resid_post": d},
                     [r["clip_id"] for r in rows], {"model_id": "planted", "frame_rate": 50.0}, "float32") as w:
        w.append({"encoder.blocks.0.resid_post": clips, "encoder.blocks.1.resid_post": clips})
    manifest = root / "manifest.tsv"
    pd.DataFrame(rows).to_csv(manifest, sep="\t", index=False)
    return root, store, manifest


PARAMS = {"architecture": "topk", "expansion": 2, "k": 4, "l1_coef": 5.0, "l0_coef": 1.0, "n_samples": 20000,
          "batch_size": 256, "lr": 5e-3, "seed": 0, "top_clips": 3, "sparse_probe_k": [1, 4], "fidelity_clips": 0,
          "dashboard_features": 8}


def test_peak_frames_find_the_planted_peak(study):
    root, store_path, _ = study
    sae = build("topk", d_in=16, expansion=2, k=4)
    with Store(store_path) as store:
        sae.init_from_data(torch.from_numpy(store.h5[f"sites/{SITE}/frames"][:]))
        acts = np.stack([store.clip_frames(SITE, i).max(0) for i in range(len(store.clip_ids))])
        top = top_activating(acts[:, :3], store.clip_ids, n=2)   # dims as stand-in "features" for the lookup
        out = peak_frames(sae, store, SITE, top)
        z = sae.encode(torch.from_numpy(store.clip_frames(SITE, 0))).detach().numpy()
    assert {"peak_frame", "peak_activation", "n_frames", "peak_s"} <= set(out.columns)
    assert (out["peak_frame"] < out["n_frames"]).all()
    first = out[out.clip_id == "c00"]
    for _, r in first.iterrows():
        assert r["peak_frame"] == z[:, r["feature"]].argmax() and r["peak_s"] == r["peak_frame"] / 50


def test_sae_stage_writes_every_artifact_and_a_dashboard(study):
    root, store, manifest = study
    out = root / "results" / SITE
    stages.sae.sae(store, manifest, SITE, PARAMS, "label", out)
    names = {p.name for p in out.iterdir()}
    assert {"cfg.json", "sae.safetensors", "metrics.json", "features.tsv", "top_clips.tsv", "sparse_probe.tsv",
            "dashboard.html"} <= names
    feats = pd.read_csv(out / "features.tsv", sep="\t")
    assert set(feats.label) == {"happy", "sad"} and len(feats) == 2 * 32
    assert {"effect_size", "auroc", "mean_difference", "rank"} <= set(feats.columns)
    happy_best = feats[(feats.label == "happy") & (feats["rank"] == 0)].iloc[0]
    assert happy_best["auroc"] > 0.9   # the planted happy atom is found
    top = pd.read_csv(out / "top_clips.tsv", sep="\t")
    assert {"feature", "rank", "clip_id", "activation", "peak_frame", "peak_s"} <= set(top.columns)
    best_top = top[top.feature == happy_best["feature"]]
    assert len(best_top) == 3 and best_top.clip_id.map(lambda c: int(c[1:]) % 2 == 0).all()  # happy clips
    probe = pd.read_csv(out / "sparse_probe.tsv", sep="\t")
    assert set(probe.k) == {1, 4} and probe[(probe.label == "happy") & (probe.k == 1)].accuracy.item() >= 0.9
    page = (out / "dashboard.html").read_text()
    assert page.count("class='card'") == 8
    src = re.search(r'<audio controls preload=\'none\' src="([^"]+)"', page).group(1)
    path, fragment = src.split("#")
    assert (out / path).resolve().is_file() and not path.startswith("/")
    start, end = map(float, fragment.removeprefix("t=").split(","))
    assert end - start == pytest.approx(1.0, abs=0.011)
    assert json.loads((out / "metrics.json").read_text())["l0"] == pytest.approx(4.0)


def test_dashboard_escapes_names_and_says_when_a_feature_never_fires(tmp_path):
    stats = pd.DataFrame({"feature": [0, 0, 1, 1], "label": ["<a>", "b", "<a>", "b"], "n_clips": 2,
                          "density": [0.5, 0.5, 0.0, 0.0], "mean_activation": [1.0, 0.0, 0.0, 0.0],
                          "mean_activation_rest": [0.0, 1.0, 0.0, 0.0], "mean_difference": [1.0, -1.0, 0.0, 0.0],
                          "effect_size": [2.0, -2.0, 0.0, 0.0], "auroc": [1.0, 0.0, 0.5, 0.5]})
    top = pd.DataFrame({"feature": [0], "rank": [0], "clip_id": ["x&y"], "activation": [1.0], "peak_s": [0.2]})
    page = write_dashboard(tmp_path / "d.html", SITE, stats, top, {"x&y": str(tmp_path / "a b.flac")},
                           clip_acts=np.array([[1.0, 0.0], [0.0, 0.0]])).read_text()
    assert "&lt;a&gt;" in page and "x&amp;y" in page and "<a>" not in page
    assert page.count("class='card'") == 1   # feature 1 never fires: not shown
    assert 'src="a b.flac#t=0.00,1.00"' in page
