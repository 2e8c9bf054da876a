"""Steering Qwen-Omni while it answers, on tiny random-init full models of the real classes
(Thinker, Talker, codec decoder; see test_adapters_qwen_omni): alpha = 0 reproduces the unsteered
answer and speech exactly, a large vector on the right site changes them, and the hooks are gone
afterwards (a second unsteered run equals the first)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from affectlens.models.omni_generate import generate_answer, generate_speech
from affectlens.steering.omni import chrf, token_similarity
from affectlens.steering.vectors import add_vector
from test_adapters_qwen_omni import clips, tiny

torch.set_num_threads(1)
FAMILIES = ["qwen3-omni", "qwen2.5-omni"]


def hooks_of(adapter):
    """Every forward (pre-)hook on the model's modules; transformers installs some of its own (to
    record hidden states), so steering must leave exactly the set it found."""
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in adapter.model.named_modules()}


def big_vector(d, seed=0, norm=50.0):
    v = np.random.default_rng(seed).standard_normal(d).astype(np.float32)
    return norm * v / np.linalg.norm(v)


def test_answer_similarities_have_known_values():
    assert token_similarity([1, 2, 3], [1, 2, 3]) == 1.0 and token_similarity([], []) == 1.0
    assert token_similarity([1, 2, 3], [1, 3]) == pytest.approx(1 - 1 / 3)  # one deletion
    assert token_similarity([1, 2], [3, 4, 5]) == 0.0
    assert chrf("happy day", "happy day") == 1.0 and chrf("xyz", "abc") == 0.0
    # "abc" vs "abd": unigrams 2/3, bigrams 1/2, trigrams 0 (longer orders absent from both):
    # P = R = 7/18, so the F-score is 7/18 whatever beta
    assert chrf("abc", "abd") == pytest.approx(7 / 18)
    assert chrf("a b c", "abd") == pytest.approx(7 / 18)  # whitespace is ignored
    # recall counts beta^2 = 4 times: a short exact prefix of the reference scores low
    assert chrf("ab", "abcdef") < chrf("abcdef", "ab")


@pytest.mark.parametrize("family", FAMILIES)
def test_thinker_steering_changes_the_answer_and_alpha_zero_does_not(family, monkeypatch):
    adapter = tiny(family, monkeypatch)
    clip = clips()[0]
    d = adapter.thinker.config.get_text_config().hidden_size
    base = generate_answer(adapter, clip, max_new_tokens=8)
    before = hooks_of(adapter)
    assert len(base.tokens) > 0
    site = "thinker.blocks.0.resid_post"
    zero = generate_answer(adapter, clip, {site: add_vector(big_vector(d), 0.0)}, max_new_tokens=8)
    assert zero.tokens == base.tokens and zero.text == base.text
    steered = generate_answer(adapter, clip, {site: add_vector(big_vector(d), 1.0)}, max_new_tokens=8)
    assert steered.tokens != base.tokens
    assert token_similarity(steered.tokens, base.tokens) < 1 and chrf(steered.text, base.text) < 1
    assert hooks_of(adapter) == before
    assert generate_answer(adapter, clip, max_new_tokens=8).tokens == base.tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_talker_steering_changes_the_codes_and_alpha_zero_does_not(family, monkeypatch):
    adapter = tiny(family, monkeypatch, full=True)
    clip = clips()[1]
    kw = dict(max_codes=8, min_codes=8, max_answer_tokens=4)
    base = generate_speech(adapter, clip, **kw)
    before = hooks_of(adapter)
    frames = 8 if family == "qwen2.5-omni" else 7  # Qwen3-Omni fills the residual codebooks of all but the last
    assert len(base.codes) == frames and base.wave is not None and np.isfinite(base.wave).all()
    d = adapter.talker.model.config.hidden_size
    site = "talker.blocks.1.resid_post"
    zero = generate_speech(adapter, clip, {site: add_vector(big_vector(d), 0.0)}, **kw)
    np.testing.assert_array_equal(zero.codes, base.codes)
    np.testing.assert_array_equal(zero.wave, base.wave)
    assert zero.answer == base.answer
    steered = generate_speech(adapter, clip, {site: add_vector(big_vector(d), 1.0)}, **kw)
    assert steered.answer == base.answer  # the Talker speaks the same answer ...
    assert steered.codes.shape == base.codes.shape and (steered.codes != base.codes).any()  # ... other codes
    assert not np.array_equal(steered.wave, base.wave)
    assert hooks_of(adapter) == before and "generate" not in vars(adapter.talker)  # its recorder is gone too
    again = generate_speech(adapter, clip, **kw)
    np.testing.assert_array_equal(again.codes, base.codes)
    np.testing.assert_array_equal(again.wave, base.wave)
    # a Thinker site in the same run changes the answer, and so what the Talker is given to speak
    d_thinker = adapter.thinker.config.get_text_config().hidden_size
    rewritten = generate_speech(adapter, clip, {"thinker.blocks.0.resid_post": add_vector(big_vector(d_thinker), 1.0)},
                                **kw)
    assert rewritten.answer.tokens != base.answer.tokens and (rewritten.codes != base.codes).any()


def test_predictor_steering_changes_only_the_residual_codebooks_of_the_first_frame(monkeypatch):
    """Qwen3-Omni: the Talker writes codebook 0 of frame 0 before the code predictor first runs, so
    steering the predictor leaves that code as it was and changes the residual codebooks."""
    adapter = tiny("qwen3-omni", monkeypatch, full=True)
    clip = clips()[1]
    kw = dict(max_codes=6, min_codes=6, max_answer_tokens=4)
    base = generate_speech(adapter, clip, **kw)
    before = hooks_of(adapter)
    d = adapter.talker.code_predictor.model.config.hidden_size
    steered = generate_speech(adapter, clip, {"predictor.blocks.0.resid_post": add_vector(big_vector(d, 1), 1.0)}, **kw)
    assert steered.codes[0, 0] == base.codes[0, 0]
    assert (steered.codes[:, 1:] != base.codes[:, 1:]).any()
    assert hooks_of(adapter) == before
    np.testing.assert_array_equal(generate_speech(adapter, clip, **kw).codes, base.codes)


@pytest.mark.parametrize("family", FAMILIES)
def test_speech_without_the_wave_skips_the_decoder_and_keeps_codes_answer_and_rows(family, monkeypatch):
    """decode=False (what Talker extraction runs): the codec decoder never runs, and the answer,
    codes, captured rows and positions are those of the decoded run."""
    adapter = tiny(family, monkeypatch, full=True)
    clip = clips()[1]
    kw = {"max_codes": 6, "min_codes": 6, "max_answer_tokens": 4, "capture": ["talker.blocks.0.resid_post"]}
    full = generate_speech(adapter, clip, **kw)
    decoder = adapter.model.token2wav if family == "qwen2.5-omni" else adapter.model.code2wav
    calls = []
    handle = decoder.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        assert generate_speech(adapter, clip, **kw).wave is not None and len(calls) == 1  # the hook sees decoding
        calls.clear()
        bare = generate_speech(adapter, clip, decode=False, **kw)
    finally:
        handle.remove()
    assert bare.wave is None and calls == []
    assert bare.answer == full.answer
    np.testing.assert_array_equal(bare.codes, full.codes)
    np.testing.assert_array_equal(bare.activations["talker.blocks.0.resid_post"],
                                  full.activations["talker.blocks.0.resid_post"])
    assert bare.positions["talker"].token.tolist() == full.positions["talker"].token.tolist()
    assert "generate" not in vars(adapter.talker) and "generate" not in vars(adapter.thinker)


def test_speech_needs_the_full_model_and_a_known_voice(monkeypatch):
    clip = clips()[1]
    with pytest.raises(ValueError, match="Thinker alone.*talker=True"):
        generate_speech(tiny("qwen3-omni", monkeypatch), clip)
    with pytest.raises(ValueError, match="voices.*Chelsie"):
        generate_speech(tiny("qwen2.5-omni", monkeypatch, full=True), clip, speaker="Nobody")
    with pytest.raises(ValueError, match="chat prompt.*Oh my God"):  # placeholders inline, no turns
        generate_speech(tiny("qwen3-omni", monkeypatch, full=True), clips()[2])
