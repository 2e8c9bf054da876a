"""Known answers of SAE feature edits: on a planted SAE with orthonormal atoms, zeroing, scaling and
clamping a feature move the activation along exactly that atom by exactly the expected amount;
alpha = 0 and empty edits are the identity; the concept picker finds a planted concept feature;
and through a real adapter the edit moves the re-encoded feature and nothing far from it."""

import numpy as np
import pytest
import torch

from affectlens.sae.registry import build
from affectlens.steering.sae_edit import FeatureEdit, concept_edits, edit_latents, merge_edits, sae_edit

D = 8


def planted_sae(d=D):
    """A ReLU SAE whose atoms are an orthonormal basis Q and whose encoder is Q^T, with no
    normalisation or biases: encode(x) = relu(Q^T x), decode(z) = Q z."""
    torch.manual_seed(0)
    sae = build("relu", d_in=d, d_sae=d, center_input=False, normalize_input=False, b_dec_init="zeros")
    q, _ = torch.linalg.qr(torch.randn(d, d))
    with torch.no_grad():
        sae.W_dec.copy_(q.T)   # row i = atom i
        sae.W_enc.copy_(q.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae, q.T


def activation(atoms, coefs, extra=None):
    """[1, 1, d]: sum of coefs_i atom_i (plus an off-dictionary residual `extra`)."""
    x = torch.as_tensor(coefs, dtype=torch.float32) @ atoms
    if extra is not None:
        x = x + extra
    return x.reshape(1, 1, -1)


def test_zero_scale_clamp_move_exactly_along_the_atom():
    sae, atoms = planted_sae()
    coefs = [2.0, 0.5, 1.0, 0.0, 3.0, 0.2, 0.0, 1.5]
    x = activation(atoms, coefs)
    cases = [(FeatureEdit(4, "zero"), -3.0 * atoms[4]),
             (FeatureEdit(2, "scale", 3.0), 2.0 * atoms[2]),
             (FeatureEdit(3, "clamp", 1.25), 1.25 * atoms[3]),      # off -> switched on at 1.25
             (FeatureEdit(0, "clamp", 1.0), torch.zeros(D))]        # already above: unchanged
    for edit, want in cases:
        got = sae_edit(sae, [edit], alpha=1.0)(x, "site") - x
        torch.testing.assert_close(got.reshape(-1), want, atol=1e-5, rtol=0)
    # alpha scales the edit; alpha 0 and no edits are the identity, exactly
    half = sae_edit(sae, [FeatureEdit(4, "zero")], alpha=0.5)(x, "site") - x
    torch.testing.assert_close(half.reshape(-1), -1.5 * atoms[4], atol=1e-5, rtol=0)
    assert sae_edit(sae, [FeatureEdit(4, "zero")], alpha=0.0)(x, "site") is x
    assert torch.equal(sae_edit(sae, [])(x, "site"), x)


def test_the_sae_error_term_is_kept():
    """An activation the SAE cannot fully encode (a negative coefficient: ReLU drops it): the part
    it does not reconstruct passes through the edit unchanged."""
    sae, atoms = planted_sae()
    x = activation(atoms, [1.0, 0, 0, 0, 0, 0, 0, 0], extra=-2.0 * atoms[5])
    out = sae_edit(sae, [FeatureEdit(0, "zero")])(x, "site")
    torch.testing.assert_close(out.reshape(-1), -2.0 * atoms[5], atol=1e-5, rtol=0)


def test_several_concepts_at_once_and_time_window():
    sae, atoms = planted_sae()
    x = activation(atoms, [1.0] * D).repeat(1, 6, 1)  # 6 frames
    both = merge_edits([FeatureEdit(1, "zero")], [FeatureEdit(6, "scale", 2.0)])
    out = sae_edit(sae, both, frames=(2, 4))(x, "site")
    torch.testing.assert_close(out[0, 2] - x[0, 2], -atoms[1] + atoms[6], atol=1e-5, rtol=0)
    assert torch.equal(out[:, :2], x[:, :2]) and torch.equal(out[:, 4:], x[:, 4:])
    with pytest.raises(ValueError, match="edited twice"):
        merge_edits([FeatureEdit(1, "zero")], [FeatureEdit(1, "scale", 2.0)])
    with pytest.raises(ValueError, match="out of range"):
        edit_latents(torch.zeros(2, D), [FeatureEdit(D, "zero")])


def test_concept_edits_find_the_planted_features():
    rng = np.random.default_rng(0)
    z = np.abs(rng.normal(0, 0.3, size=(40, 16)))
    labels = np.array(["calm"] * 20 + ["angry"] * 20)
    z[labels == "angry", 7] += 2.0    # the angry feature
    z[labels == "calm", 11] += 1.5    # the calm feature
    edits = concept_edits(z, labels, "calm", "angry", k=1)
    assert edits == [FeatureEdit(7, "clamp", pytest.approx(z[labels == "angry", 7].mean())), FeatureEdit(11, "zero")]


def test_edit_through_a_real_adapter_moves_the_reencoded_feature():
    """A tiny Whisper with an SAE at an encoder site: zeroing a feature through the adapter's hook
    leaves that feature at ~0 when the steered site is re-encoded, and alpha 0 reproduces the
    unsteered activations exactly."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from affectlens.models.whisper import WhisperAdapter

    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=150)
    adapter = WhisperAdapter(WhisperForConditionalGeneration(cfg).eval(), "tiny", "",
                             feature_extractor=WhisperFeatureExtractor(chunk_length=3))
    site = "encoder.blocks.0.resid_post"
    wave = (0.1 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)).astype(np.float32)
    batch = adapter.prepare([wave])
    n = batch.n_frames[0]
    _, cache = adapter.run(batch, capture=[site])
    x = cache[site][0, :n].float()
    sae = build("topk", d_in=32, expansion=4, k=8)
    sae.init_from_data(x)
    z = sae.encode(x)
    f = int(z.gt(0).float().mean(0).argmax())  # the feature firing most often
    _, steered = adapter.run(batch, capture=[site], interventions={site: sae_edit(sae, [FeatureEdit(f, "zero")])})
    _, same = adapter.run(batch, capture=[site], interventions={site: sae_edit(sae, [FeatureEdit(f, "zero")], alpha=0)})
    assert torch.equal(same[site], cache[site])
    assert z[:, f].abs().mean() > 0.01
    assert sae.encode(steered[site][0, :n].float())[:, f].abs().mean() < 0.1 * z[:, f].abs().mean()
