"""Trimmed Whisper (`trim: true`): the encoder on each clip's own frames. On a tiny random-init
Whisper: the conv stem's output equals the padded window's exactly over real frames (only attention
changes), a clip's frames do not depend on what it is batched with, `run_from` agrees with a hooked
run, and stores of the two regimes are told apart and refuse to merge; the setting is refused where it
cannot apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from affectlens.extract import extract_store
from affectlens.models.config import ModelConfig, SettingsError
from affectlens.models.whisper import WhisperAdapter
from affectlens.store import MergeError, Store, merge_stores

SITES = ["encoder.embed", "encoder.blocks.0.resid_post", "encoder.blocks.1.resid_post"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=100, d_model=32, max_source_positions=1500, encoder_layers=2, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=48,
                           decoder_ffn_dim=48, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                           eos_token_id=1, decoder_start_token_id=1)
    return WhisperForConditionalGeneration(config).eval()


def waves(lengths=(16_000, 7_001, 31_999, 12_345)):
    rng = np.random.default_rng(0)
    t = np.arange(max(lengths)) / 16000
    voice = np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return [(0.2 * voice[:n] + 0.02 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


def frames(adapter, clips, sites=SITES):
    batch = adapter.prepare(clips)
    _, cache = adapter.run(batch, capture=sites)
    return {s: [cache[s][i, :n].numpy() for i, n in enumerate(batch.n_frames)] for s in sites}, batch


def test_trimmed_stem_equals_the_window_and_attention_alone_differs(model):
    clips = waves()
    padded, _ = frames(WhisperAdapter(model, "m"), clips)
    trimmed, batch = frames(WhisperAdapter(model, "m", trim=True), clips)
    assert batch.n_frames == [50, 22, 100, 39]  # ceil(samples / 320)
    assert batch.inputs["input_features"].shape[-1] == 2 * 100 + 2  # the longest clip + 2 frames of context
    for a, b in zip(trimmed["encoder.embed"], padded["encoder.embed"]):
        np.testing.assert_allclose(a, b, atol=1e-5)  # same features, same stem, same positions
    moved = [np.abs(a - b).max() for a, b in zip(trimmed["encoder.blocks.1.resid_post"],
                                                padded["encoder.blocks.1.resid_post"])]
    assert min(moved) > 1e-3  # without 30 s of padding to attend to, the blocks compute something else


def test_a_trimmed_clip_does_not_depend_on_its_batch(model):
    adapter = WhisperAdapter(model, "m", trim=True)
    clips = waves()
    together, _ = frames(adapter, clips)
    for i, clip in enumerate(clips):
        alone, _ = frames(adapter, [clip])
        for s in SITES:
            np.testing.assert_allclose(alone[s][0], together[s][i], atol=1e-5, err_msg=f"clip {i} at {s}")


def test_trimmed_run_from_equals_the_hooked_run(model):
    adapter = WhisperAdapter(model, "m", trim=True)
    batch = adapter.prepare(waves())
    _, cache = adapter.run(batch, capture=["encoder.blocks.0.resid_post", "encoder.blocks.1.resid_post"])
    edited = cache["encoder.blocks.0.resid_post"] * 1.5
    _, want = adapter.run(batch, capture=["encoder.blocks.1.resid_post"],
                          interventions={"encoder.blocks.0.resid_post": lambda a, _: edited})
    _, got = adapter.run_from(batch, "encoder.blocks.0.resid_post", edited, capture=["encoder.blocks.1.resid_post"])
    for i, n in enumerate(batch.n_frames):
        torch.testing.assert_close(got["encoder.blocks.1.resid_post"][i, :n], want["encoder.blocks.1.resid_post"][i, :n])


def test_stores_of_the_two_regimes_say_so_and_never_merge(model, tmp_path):
    import pandas as pd

    clips = waves()
    manifest = pd.DataFrame({"clip_id": [f"c{i}" for i in range(4)], "path": [f"c{i}" for i in range(4)]})
    lookup = dict(zip(manifest["path"], clips))
    paths = {}
    for trim, rng in ((False, (0, 2)), (True, (2, 4))):
        paths[trim] = extract_store(manifest, WhisperAdapter(model, "m", trim=trim), SITES, tmp_path / f"{trim}.h5",
                                    load_wave=lookup.__getitem__, clip_range=rng, progress=False)
    with Store(paths[False]) as p, Store(paths[True]) as t:
        assert (p.attrs["input_regime"], t.attrs["input_regime"]) == ("padded-30s", "trimmed")
    with pytest.raises(MergeError, match="input_regime"):
        merge_stores([paths[False], paths[True]], tmp_path / "mixed.h5")
    assert not (tmp_path / "mixed.h5").exists()


def test_trim_is_refused_where_it_cannot_apply(model):
    with pytest.raises(SettingsError, match="trim: only the whisper family"):
        ModelConfig.from_dict({"family": "wav2vec2", "source": "x", "sites": ["encoder.embed"], "trim": True})
    assert ModelConfig.from_dict({"family": "whisper", "source": "x", "sites": ["encoder.embed"], "trim": True}).trim
    with pytest.raises(ValueError, match="decoder tower was trained on the padded 30 s window"):
        WhisperAdapter(model, "m", towers=("encoder", "decoder"), trim=True)
