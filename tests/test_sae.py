"""Sparse autoencoders: metrics on hand-computed cases, config validation, the TopK module's
constraints, a known-answer test on a planted dictionary, artifacts, training from a store,
per-feature statistics, and the scikit-learn estimator contract for every registered architecture."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from affectlens.sae import (ARCHITECTURES, BatchTopKConfig, ForwardOutput, JumpReLUConfig, ReLUConfig,
                            SparseAutoencoder, TopKConfig, TopKSAE, auroc, build, clip_features, dead_fraction,
                            explained_variance, feature_stats, l0, load_sae, normalised_mse, save_sae,
                            top_activating, train_sae)
from affectlens.sae.metrics import update_tokens_since_fired
from affectlens.sae.topk import geometric_median
from affectlens.sae.train import (batches_from_chunks, batches_from_chunks_all, held_out_split, row_chunks,
                                  train_loop, training_stream)
from affectlens.store import Store, write_store

SITE = "encoder.blocks.3.resid_post"


pytestmark = pytest.mark.usefixtures("one_thread")


def planted(n: int, d: int = 64, n_atoms: int = 256, per_sample: int = 4, noise: float = 0.01, seed: int = 0):
    """Each row: a sum of `per_sample` unit-norm atoms with coefficients in [0.5, 1.5], plus noise."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = np.stack([rng.choice(n_atoms, per_sample, replace=False) for _ in range(n)])
    coef = rng.uniform(0.5, 1.5, (n, per_sample))
    X = np.einsum("nk,nkd->nd", coef, atoms[idx]) + noise * rng.standard_normal((n, d))
    return X.astype(np.float32), atoms


# -- metrics ---------------------------------------------------------------------------------------

def test_metrics_on_hand_computed_cases():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])       # mean (2, 0): total variance 1 + 1 = 2
    recon = torch.tensor([[1.0, 0.0], [2.0, 0.0]])   # squared error 1
    assert float(explained_variance(x, recon)) == pytest.approx(0.5)
    assert float(explained_variance(x, x)) == pytest.approx(1.0)
    assert float(explained_variance(x, x.mean(0).expand_as(x))) == pytest.approx(0.0)
    assert float(normalised_mse(x, recon)) == pytest.approx(1 / 10)  # ||x||^2 = 1 + 9
    assert float(l0(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]]))) == pytest.approx(1.0)
    assert float(l0(np.array([[0.0, 0.5]]))) == pytest.approx(1.0)   # numpy accepted too
    assert float(dead_fraction(torch.tensor([0, 5, 10, 20]), window=10)) == pytest.approx(0.5)

    tsf = torch.tensor([3, 7, 0])
    latents = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert update_tokens_since_fired(tsf, latents).tolist() == [5, 0, 2]


def test_explained_variance_is_differentiable():
    x = torch.randn(8, 3)
    recon = torch.zeros(8, 3, requires_grad=True)
    (1 - explained_variance(x, recon)).backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0


def test_geometric_median_resists_outliers():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1000.0, 0.0]])
    assert geometric_median(x).tolist() == pytest.approx([1.0, 0.0], abs=1e-3)


# -- config and registry ---------------------------------------------------------------------------

def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match=r"unknown TopKConfig keys \['kk'\]"):
        TopKConfig.from_dict({"d_in": 8, "kk": 3})
    for bad, key in [({"k": 0}, "k"), ({"k": 100, "expansion": 2}, "k"), ({"lr": -1.0}, "lr"),
                     ({"d_sae": 0}, "d_sae"), ({"b_dec_init": "median"}, "b_dec_init"),
                     ({"batch_size": 1.5}, "batch_size"), ({"aux_coef": -0.1}, "aux_coef"),
                     ({"decoder_lr_scale": 0.0}, "decoder_lr_scale")]:
        with pytest.raises(ValueError, match=f"TopKConfig.{key}"):
            TopKConfig(d_in=8, **bad)
    cfg = TopKConfig(d_in=8, d_sae=40, k=4)
    assert cfg.n_latents == 40 and TopKConfig(d_in=8).n_latents == 64
    assert TopKConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 5


def test_every_architecture_validates_its_own_keys():
    for cls, bad in [(BatchTopKConfig, {"max_k_factor": 0}), (BatchTopKConfig, {"threshold_momentum": 1.0}),
                     (JumpReLUConfig, {"bandwidth": 0.0}), (JumpReLUConfig, {"l0_coef": -1.0}),
                     (ReLUConfig, {"l1_coef": -1.0}), (ReLUConfig, {"lr_decay": 2.0})]:
        key = next(iter(bad))
        with pytest.raises(ValueError, match=f"{cls.__name__}.{key}"):
            cls(d_in=8, **bad)
    with pytest.raises(ValueError, match="unknown ReLUConfig keys \\['k'\\]"):
        ReLUConfig.from_dict({"d_in": 8, "k": 4})
    assert JumpReLUConfig.from_dict(JumpReLUConfig(d_in=8).to_dict()) == JumpReLUConfig(d_in=8)


def test_registry_builds_and_names_known_architectures():
    sae = build("topk", d_in=8, k=2, expansion=2)
    assert isinstance(sae, TopKSAE) and sae.cfg.n_latents == 16
    known = r"\['batchtopk', 'jumprelu', 'relu', 'topk'\]"
    with pytest.raises(ValueError, match=rf"unknown SAE architecture 'gated'; known: {known}"):
        build("gated", d_in=8)
    with pytest.raises(ValueError, match="unknown TopKConfig keys"):
        build("topk", d_in=8, lambda_l1=1.0)


# -- the TopK module --------------------------------------------------------------------------------

def test_forward_is_named_and_topk_sparse():
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=16, expansion=4, k=3))
    x = torch.randn(32, 16) * 5 + 2
    sae.init_from_data(x)
    out = sae(x)
    assert isinstance(out, ForwardOutput)
    assert out.recon.shape == (32, 16) and out.latents.shape == (32, 64)
    assert ((out.latents != 0).sum(1) <= 3).all() and (out.latents >= 0).all()
    assert float(out.aux_loss) == 0.0  # no dead mask given
    torch.testing.assert_close(out.recon, sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, out.fvu)
    # encoder starts as the decoder transpose, decoder rows at unit norm
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_input_normalisation_and_bias_init():
    x = torch.randn(2000, 16) * 30 + 100
    sae = TopKSAE(TopKConfig(d_in=16, expansion=2, k=4, b_dec_init="mean"))
    sae.init_from_data(x)
    torch.testing.assert_close(sae.input_mean, x.mean(0))       # mean-centred ...
    x_n = sae.normalise(x)
    assert float(x_n.pow(2).sum(1).mean()) == pytest.approx(16, rel=1e-4)   # ... and E||x_n||^2 = d_in
    torch.testing.assert_close(sae.b_dec.detach(), x_n.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(sae.denormalise(x_n), x, rtol=1e-5, atol=1e-3)
    raw = TopKSAE(TopKConfig(d_in=16, expansion=2, k=4, center_input=False, b_dec_init="mean"))
    raw.init_from_data(x)
    assert float((x * raw.input_scale).pow(2).sum(1).mean()) == pytest.approx(16, rel=1e-4)
    off = TopKSAE(TopKConfig(d_in=16, expansion=2, k=4, center_input=False, normalize_input=False, b_dec_init="zeros"))
    off.init_from_data(x)
    assert float(off.input_scale) == 1.0 and float(off.b_dec.detach().abs().sum()) == 0.0
    assert float(off.input_mean.abs().sum()) == 0.0


def test_sparse_backward_matches_the_dense_one():
    # The TopK step differentiates only through the selected latents; it must equal autograd
    # through a dense encoder.
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=8, expansion=4, k=3, aux_k=4))
    x = torch.randn(64, 8) * 2 + 1
    sae.init_from_data(x)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[5:20] = True
    sae(x, dead_mask=dead).loss.backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    x_n = sae.normalise(x)
    h = x_n - sae.b_dec
    pre = torch.nn.functional.relu(torch.nn.functional.linear(h, sae.W_enc, sae.b_enc))
    vals, idx = pre.topk(3, dim=-1)
    recon = torch.zeros_like(pre).scatter(-1, idx, vals) @ sae.W_dec + sae.b_dec
    fvu = 1 - explained_variance(x_n, recon)
    a_vals, a_idx = pre.masked_fill(~dead, -float("inf")).topk(4, dim=-1)
    aux_recon = torch.zeros_like(pre).scatter(-1, a_idx, a_vals.clamp_min(0)) @ sae.W_dec
    aux = 1 - explained_variance((x_n - recon).detach(), aux_recon)
    (fvu + sae.cfg.aux_coef * aux * min(15 / 4, 1.0)).backward()
    for n, p in sae.named_parameters():
        torch.testing.assert_close(sparse[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_decoder_constraints():
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=8, expansion=4, k=2))
    sae(torch.randn(64, 8)).loss.backward()
    sae.remove_parallel_grads()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-6
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_auxk_loss_trains_only_dead_latents():
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=8, expansion=4, k=2, aux_k=4))
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:16] = True
    out = sae(torch.randn(256, 8), dead_mask=dead)
    assert out.aux_loss.item() > 0
    out.aux_loss.backward()
    assert sae.W_enc.grad[~dead].abs().max() == 0 and sae.W_dec.grad[~dead].abs().max() == 0
    assert sae.W_enc.grad[dead].abs().sum() > 0 and sae.W_dec.grad[dead].abs().sum() > 0


# -- artifacts and the store ---------------------------------------------------------------------

def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    X, _ = planted(2000, d=16, n_atoms=32)
    est = SparseAutoencoder("topk", expansion=2, k=4, n_samples=4096, batch_size=256, lr=1e-3).fit(X, device="cpu")
    save_sae(est.sae_, tmp_path / "site")
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == ["cfg.json", "sae.safetensors"]
    assert json.loads((tmp_path / "site" / "cfg.json").read_text())["architecture"] == "topk"
    loaded = load_sae(tmp_path / "site")
    assert loaded.cfg == est.sae_.cfg
    x = torch.from_numpy(X[:100])
    with torch.no_grad():
        a, b = est.sae_(x), loaded(x)
    assert torch.equal(a.recon, b.recon) and torch.equal(a.latents, b.latents)
    with pytest.raises(FileNotFoundError, match="cfg.json is missing"):
        load_sae(tmp_path)


def _tiny_store(path, n_clips=40, d=16, seed=0):
    rng = np.random.default_rng(seed)
    X, _ = planted(4000, d=d, n_atoms=32, seed=seed)
    lengths = rng.integers(20, 60, n_clips)
    clips = np.split(X[:lengths.sum()], np.cumsum(lengths)[:-1])
    with write_store(path, {SITE: d}, [f"clip{i:03d}" for i in range(n_clips)],
                     {"model_id": "test/planted"}, storage_dtype="float32") as w:
        w.append({SITE: clips})
    return Store(path), clips


def test_held_out_split_is_by_clip():
    assert held_out_split(np.arange(11), 0.1) == 9        # 10 clips: the last one held out
    assert held_out_split(np.arange(21), 0.1) == 18       # 20 clips: the last two
    assert held_out_split(np.arange(3), 0.1) == 1         # always at least one clip each side
    with pytest.raises(ValueError, match="at least 2"):
        held_out_split(np.arange(2), 0.1)


def test_training_stream_covers_the_training_rows_once_per_epoch():
    rows = np.arange(100, dtype=np.float32)[:, None]
    epoch = np.concatenate(list(row_chunks(rows, 0, 90, 7, shuffle=True, seed=1)))[:, 0]
    assert sorted(epoch) == list(range(90)) and list(epoch) != list(range(90))   # no held-out row
    batches = list(batches_from_chunks(row_chunks(rows, 0, 90, 7, shuffle=True, seed=1), 16))
    assert [len(b) for b in batches] == [16] * 5   # full batches only; the remainder waits
    assert [len(b) for b in batches_from_chunks_all([rows[:20]], 16)] == [16, 4]


def test_resumed_stream_continues_where_it_stopped():
    rows = np.arange(50, dtype=np.float32)[:, None]
    whole = np.concatenate([c for c, _ in zip(training_stream(rows, 0, 50, 7, seed=3), range(30))])[:, 0]
    for skip in (0, 5, 7, 49, 50, 123):
        tail = np.concatenate([c for c, _ in zip(training_stream(rows, 0, 50, 7, seed=3, skip=skip), range(30))])[:, 0]
        np.testing.assert_array_equal(tail[:40], whole[skip:skip + 40])
    assert sorted(whole[50:100]) == list(range(50)) and list(whole[50:100]) != list(whole[:50])  # a new order per epoch


def test_shuffled_chunks_mix_rows_from_across_the_store():
    # 10 "actors" of 1000 consecutive rows each (a store is ordered by clip): every shuffled chunk,
    # and even every batch of 100 rows, draws from (nearly) all of them, not from one or two.
    rows = np.arange(10_000, dtype=np.float32)[:, None]
    chunks = list(row_chunks(rows, 0, 10_000, 1000, shuffle=True, seed=0))
    assert sorted(np.concatenate(chunks)[:, 0]) == list(range(10_000))
    assert len(chunks) == 11 and min(len(c) for c in chunks[:-1]) >= 985   # 66 blocks of (up to) 15 rows
    for chunk in chunks[:-1]:
        assert len(np.unique(chunk[:, 0] // 1000)) == 10
    first_batches = next(batches_from_chunks(iter(chunks), 100)).numpy()[:, 0]
    assert len(np.unique(first_batches // 1000)) >= 8
    plain = list(row_chunks(rows, 0, 10_000, 1000, shuffle=False, seed=0))
    assert [len(np.unique(c[:, 0] // 1000)) for c in plain] == [1] * 10   # unshuffled: in order


def test_decoder_steps_at_decoder_lr_scale_times_the_learning_rate():
    # Adam's first step moves each coordinate by lr (|m / sqrt(v)| = 1): every encoder weight that
    # got a gradient moves by exactly lr, and a unit decoder row (the step orthogonal to it) turns by
    # about lr * sqrt(d_in) radians, times decoder_lr_scale.
    X = torch.from_numpy(planted(512, d=16, n_atoms=32)[0])
    sae = build("topk", d_in=16, expansion=4, k=4, n_samples=256, batch_size=256, lr=1e-3, lr_decay=0.0)
    sae.init_from_data(X)
    w_enc, w_dec = sae.W_enc.detach().clone(), sae.W_dec.detach().clone()
    state = train_loop(sae, [X[:256]], progress=False)
    assert [g["lr"] for g in state.optimizer.param_groups] == [pytest.approx(1e-2), pytest.approx(1e-3)]
    moved = (sae.W_enc.detach() - w_enc).abs()
    assert float(moved[moved > 0].median()) == pytest.approx(1e-3, rel=1e-4)
    angle = torch.arccos((sae.W_dec.detach() * w_dec).sum(1).clamp(-1, 1))
    assert float(angle[angle > 0].median()) == pytest.approx(10 * 1e-3 * 16 ** 0.5, rel=0.05)


def test_train_sae_from_store_writes_artifacts(tmp_path):
    store, clips = _tiny_store(tmp_path / "acts.h5")
    cfg = TopKConfig(d_in=16, expansion=4, k=4, n_samples=30_000, batch_size=256, lr=3e-3, dead_tokens=5000)
    out = tmp_path / "sae" / SITE
    with store:
        metrics = train_sae(store, SITE, cfg, out, progress=False, chunk_rows=500, checkpoint=tmp_path / "ck.pt",
                            checkpoint_every_s=0)
        with pytest.raises(ValueError, match="d_in = 8"):
            train_sae(store, SITE, TopKConfig(d_in=8, expansion=2, k=2), tmp_path / "x", progress=False)
        with pytest.raises(KeyError, match="not in"):
            train_sae(store, "encoder.blocks.9.resid_post", cfg, tmp_path / "x", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "metrics.json", "sae.safetensors"]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert not (tmp_path / "ck.pt").exists() and metrics["resumed_from_samples"] == 0
    assert metrics["eval_clips"] == 4 and metrics["train_frames"] == sum(len(c) for c in clips[:36])
    assert metrics["eval_frames"] == sum(len(c) for c in clips[36:])
    assert metrics["samples_seen"] >= 30_000 and metrics["l0"] == pytest.approx(4.0)
    assert metrics["explained_variance"] > 0.5 and metrics["dead_window"] == metrics["eval_frames"]
    sae = load_sae(out)
    held_out = torch.from_numpy(np.concatenate(clips[36:]))
    with torch.no_grad():
        ev = float(explained_variance(held_out, sae(held_out).recon))
    assert ev == pytest.approx(metrics["explained_variance"], abs=1e-5)


# -- features -------------------------------------------------------------------------------------

def test_feature_stats_on_hand_computed_case():
    acts = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    df = feature_stats(acts, ["a", "a", "b", "b"], frame_density=np.array([0.1, 0.2]))
    assert list(df.columns) == ["feature", "label", "n_clips", "density", "frame_density",
                                "mean_activation", "mean_activation_rest", "mean_difference", "effect_size", "auroc"]
    row = df.set_index(["feature", "label"])
    assert row.loc[(0, "a"), "mean_activation"] == 1.5 and row.loc[(0, "a"), "mean_activation_rest"] == 0
    assert row.loc[(0, "a"), "auroc"] == 1.0 and row.loc[(0, "b"), "auroc"] == 0.0
    assert row.loc[(1, "a"), "auroc"] == 0.25   # a: {0, 0} vs b: {3, 0} -> (0 + 0.5) / 2
    assert row.loc[(0, "a"), "density"] == 0.5 and row.loc[(1, "b"), "density"] == 0.25
    assert row.loc[(0, "a"), "mean_difference"] == 1.5
    # Cohen's d: a = {1, 2} vs b = {0, 0}: diff 1.5, pooled sd sqrt((0.5 + 0) / 2) = 0.5
    assert row.loc[(0, "a"), "effect_size"] == pytest.approx(3.0)
    unlabeled = feature_stats(acts, ["a", None, "b", ""])
    assert set(unlabeled["n_clips"]) == {1}

    top = top_activating(acts, ["c0", "c1", "c2", "c3"], n=3)
    assert top[top.feature == 0].clip_id.tolist() == ["c1", "c0"]
    assert top[top.feature == 1].clip_id.tolist() == ["c2"]   # only clips where the feature fires


def test_auroc_matches_sklearn():
    rng = np.random.default_rng(0)
    scores = np.round(rng.standard_normal((200, 5)), 1)  # rounded: ties included
    y = rng.random(200) < 0.3
    ours = auroc(scores, y)
    assert ours == pytest.approx([roc_auc_score(y, scores[:, j]) for j in range(5)])


def test_clip_features_reduce_each_clip(tmp_path):
    store, clips = _tiny_store(tmp_path / "acts.h5", n_clips=12)
    sae = build("topk", d_in=16, expansion=2, k=3)
    sae.init_from_data(torch.from_numpy(np.concatenate(clips)))
    with store:
        mean = clip_features(sae, store, SITE, batch_frames=100)
        mx = clip_features(sae, store, SITE, reduce="max", batch_frames=100)
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(clips[5])).numpy()
    np.testing.assert_allclose(mean.acts[5], z.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mx.acts[5], z.max(0), rtol=1e-6)
    with torch.no_grad():
        z_all = sae.encode(torch.from_numpy(np.concatenate(clips))).numpy()
    np.testing.assert_allclose(mean.frame_density, (z_all > 0).mean(0))


# -- the estimator contract, for every registered architecture -------------------------------------

@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_estimator_contract(architecture):
    X, _ = planted(1000, d=16, n_atoms=32)
    sparsity = {"topk": {"k": 4}, "batchtopk": {"k": 4}, "relu": {"l1_coef": 1.0}, "jumprelu": {"l0_coef": 1.0}}
    params = {"expansion": 2, **sparsity[architecture], "n_samples": 2048, "batch_size": 256}
    est = SparseAutoencoder(architecture, **params)
    assert vars(est) == {"architecture": architecture, "hparams": params}   # __init__ stores only
    assert est.get_params() == {"architecture": architecture, **params}
    with pytest.raises(AttributeError, match="not fitted"):
        est.transform(X)
    assert est.fit(X) is est
    learned = {k for k in vars(est) if k not in ("architecture", "hparams")}
    assert learned and all(k.endswith("_") and not k.startswith("_") for k in learned)
    assert est.n_features_in_ == 16
    Z = est.transform(X)
    assert Z.shape == (1000, est.sae_.cfg.n_latents)
    assert est.inverse_transform(Z).shape == X.shape
    assert isinstance(est.score(X), float)
    fresh = clone(est)
    assert fresh.get_params() == est.get_params() and not hasattr(fresh, "sae_")
    first = est.sae_
    assert est.set_params(seed=3).fit(X).sae_ is not first and est.sae_.cfg.seed == 3  # refit replaces
    with pytest.raises(ValueError, match="d_in is taken from X"):
        SparseAutoencoder(architecture, d_in=16).fit(X)
