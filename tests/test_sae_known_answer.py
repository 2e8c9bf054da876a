"""Known answers for the SAEs: every architecture recovers a planted sparse dictionary, the
concept finder ranks a planted concept feature first, and an interrupted run resumes onto exactly
the weights of an uninterrupted one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from affectlens.sae import SparseAutoencoder, build, evaluate
from affectlens.sae.concept import rank_features, sparse_probe
from affectlens.sae.features import encode_array
from affectlens.sae.train import batches_from_chunks_all, fit_array, load_checkpoint, save_checkpoint

D, N_ATOMS, PER_FRAME, FRAMES_PER_CLIP, N_CLIPS = 32, 48, 3, 40, 600
COMMON = dict(expansion=4, n_samples=80_000, batch_size=256, lr=1e-2, dead_tokens=5_000, aux_k=16, seed=0)
SETTINGS = {  # chosen once on this data; each trains in a few seconds on one thread
    "topk": dict(k=4),
    "batchtopk": dict(k=4),
    "jumprelu": dict(l0_coef=1.0, init_threshold=1.0, bandwidth=0.5),
    "relu": dict(l1_coef=1.5),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def planted_clips(seed: int = 0):
    """Frames = sums of PER_FRAME unit atoms (coefficients 0.5-1.5) + noise, grouped in clips.
    Atom 0 is the concept: it appears (in half their frames) only in the first half of the clips."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((N_ATOMS, D))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    n = N_CLIPS * FRAMES_PER_CLIP
    concept_clip = np.arange(N_CLIPS) < N_CLIPS // 2
    idx = np.stack([1 + rng.choice(N_ATOMS - 1, PER_FRAME, replace=False) for _ in range(n)])
    with_concept = np.repeat(concept_clip, FRAMES_PER_CLIP) & (rng.random(n) < 0.5)
    idx[with_concept, 0] = 0
    coef = rng.uniform(0.5, 1.5, (n, PER_FRAME))
    X = np.einsum("nk,nkd->nd", coef, atoms[idx]) + 0.01 * rng.standard_normal((n, D))
    order = rng.permutation(N_CLIPS)  # clips interleaved, concept or not
    X = X.reshape(N_CLIPS, FRAMES_PER_CLIP, D)[order].reshape(n, D).astype(np.float32)
    return X, atoms, concept_clip[order]


@pytest.fixture(scope="module")
def data():
    return planted_clips()


@pytest.fixture(scope="module")
def trained(data):
    X, _, _ = data
    cut = len(X) - 5000
    return {arch: SparseAutoencoder(arch, **COMMON, **SETTINGS[arch]).fit(X[:cut]) for arch in SETTINGS}


def recovery(W: np.ndarray, atoms: np.ndarray) -> float:
    """Share of atoms with a decoder row at cosine >= 0.9."""
    return float(((atoms @ W.T).max(1) >= 0.9).mean())


@pytest.mark.parametrize("architecture", sorted(SETTINGS))
def test_each_architecture_recovers_the_planted_dictionary(architecture, data, trained):
    X, atoms, _ = data
    est = trained[architecture]
    rec = recovery(est.sae_.W_dec.detach().numpy(), atoms)
    held_out = evaluate(est.sae_, batches_from_chunks_all([X[-5000:]], 4096))
    print(f"\n{architecture}: recovery={rec:.3f} EV={held_out['explained_variance']:.3f} L0={held_out['l0']:.2f}")
    assert rec >= 0.9
    assert held_out["explained_variance"] >= 0.8
    if architecture == "topk":
        assert held_out["l0"] == pytest.approx(4.0)
    else:
        assert 1.5 <= held_out["l0"] <= 12


def test_decoder_rows_stay_unit_norm(trained):
    for est in trained.values():
        torch.testing.assert_close(est.sae_.W_dec.norm(dim=1), torch.ones(est.sae_.cfg.n_latents))


def test_concept_finder_ranks_the_planted_concept_feature_first(data, trained):
    X, atoms, concept = data
    sae = trained["topk"].sae_
    clip_acts = encode_array(sae, X).reshape(N_CLIPS, FRAMES_PER_CLIP, -1).mean(1)
    ranking = rank_features(clip_acts, concept)
    best = int(ranking.iloc[0]["feature"])
    W = sae.W_dec.detach().numpy()
    assert float(W[best] @ atoms[0]) >= 0.9        # the first-ranked feature is the planted concept atom
    assert ranking.iloc[0]["auroc"] >= 0.99 and ranking.iloc[0]["effect_size"] > 2
    assert list(ranking["rank"]) == list(range(len(ranking)))
    probe = sparse_probe(clip_acts, concept, ks=(1, 4), n_splits=3)
    assert probe.loc[probe.k == 1, "accuracy"].item() >= 0.95
    assert probe.loc[probe.k == 1, "features"].item() == str(best)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_an_interrupted_run_resumes_onto_the_same_weights(architecture, data, tmp_path):
    X = data[0][:4000]
    cfg = dict(d_in=D, expansion=2, n_samples=6000, batch_size=256, lr=5e-3, dead_tokens=1000, aux_k=8, k=4)
    full = build(architecture, **cfg)
    fit_array(full, X)

    class Stop(Exception):
        pass

    part = build(architecture, **cfg)

    def stop_after_10(state):
        save_checkpoint(tmp_path / "ck.pt", part, state)
        if state.steps == 10:
            raise Stop

    with pytest.raises(Stop):
        fit_array(part, X, on_step=stop_after_10)
    resumed = build(architecture, **cfg)
    state = load_checkpoint(tmp_path / "ck.pt", resumed)
    assert state.steps == 10 and state.samples_seen == 2560
    fit_array(resumed, X, state=state)
    for name, p in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], p, rtol=1e-5, atol=1e-6, msg=name)
    assert load_checkpoint(tmp_path / "ck.pt", build(architecture, **{**cfg, "seed": 1})) is None  # other config
