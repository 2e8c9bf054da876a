"""Qwen2.5-Omni and Qwen3-Omni Thinkers on tiny random-init configs of the real transformers classes,
driven through their real processors (Whisper features, placeholder expansion; a small BPE
vocabulary): the audio span is indexed exactly with each token's time, and every stored audio
encoder and Thinker site equals the model's own forward on the clip alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.processing_utils import ProcessorMixin

from affectlens.models.qwen_omni import QwenOmniAdapter, audio_times
from affectlens.store import Store
from test_adapters_common import Recorder, extract_to_store, stored_equals_reference, tiny_bpe

torch.set_num_threads(1)
SPECIAL = {"audio_bos_token": "<|audio_start|>", "audio_token": "<|audio_pad|>", "audio_eos_token": "<|audio_end|>",
           "vision_bos_token": "<|vision_start|>", "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
           "vision_eos_token": "<|vision_end|>"}


def processor(cls, monkeypatch, extra=()):
    """The real processor class; its video processor needs torchvision, which cannot be installed
    beside this CPU torch, so the constructor's type check is skipped for that unused slot.
    `extra` tokens become single (special) tokens of the small vocabulary."""
    tok = tiny_bpe(list(SPECIAL.values()) + list(extra))
    tok = transformers.Qwen2Tokenizer(tokenizer_object=tok.backend_tokenizer, eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>", extra_special_tokens=SPECIAL)
    with monkeypatch.context() as m:
        m.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
        return cls(image_processor=transformers.Qwen2VLImageProcessor(patch_size=16, merge_size=2),
                   video_processor=None, feature_extractor=transformers.WhisperFeatureExtractor(feature_size=128),
                   tokenizer=tok)


def tiny(family, monkeypatch, full=False):
    """A tiny random-init Thinker, or with `full` the whole model (Thinker, Talker, codec decoder)."""
    torch.manual_seed(0)
    if family == "qwen3-omni":
        proc = processor(transformers.Qwen3OmniMoeProcessor, monkeypatch, TALKER_TOKENS if full else ())
        cfg_cls, model_cls = transformers.Qwen3OmniMoeThinkerConfig, transformers.Qwen3OmniMoeThinkerForConditionalGeneration
        audio = dict(n_window=50, n_window_infer=100, downsample_hidden_size=8)
        vision = dict(patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0])
        text = dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, head_dim=16)
    else:
        proc = processor(transformers.Qwen2_5OmniProcessor, monkeypatch, TALKER_TOKENS if full else ())
        cfg_cls, model_cls = transformers.Qwen2_5OmniThinkerConfig, transformers.Qwen2_5OmniThinkerForConditionalGeneration
        audio, vision = dict(n_window=100), dict(patch_size=16, fullatt_block_indexes=[1], window_size=64)
        text = dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    tok = proc.tokenizer
    thinker = dict(
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=48, d_model=32,
                          output_dim=32, **audio),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32, **vision),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, **text),
        audio_token_id=tok.audio_token_id, image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
        audio_start_token_id=tok.convert_tokens_to_ids("<|audio_start|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"))
    if full:
        return QwenOmniAdapter(full_model(family, thinker, tok).eval(), f"tiny-{family}-full", family=family,
                               processor=proc)
    return QwenOmniAdapter(model_cls(cfg_cls(**thinker)).eval(), f"tiny-{family}", family=family, processor=proc)


TALKER_TOKENS = ["user", "assistant", "<|tts_pad|>", "<|tts_bos|>", "<|tts_eos|>", "<|voice|>"]
N_CODES = 64  # codebook size of the tiny Talkers; their special codec ids follow


def full_model(family, thinker: dict, tok):
    """The full model's real classes on tiny configs: Qwen2.5-Omni's Talker, DiT and BigVGAN
    (the speaker's conditioning drawn here in place of spk_dict.pt); Qwen3-Omni's MoE Talker with a
    4-codebook code predictor and its code2wav. Codec vocabularies put the special codes after the
    N_CODES codes (Qwen3-Omni's generate suppresses the Talker vocabulary's last 1024 ids but EOS)."""
    ids, nc = tok.convert_tokens_to_ids, N_CODES
    vocab = {k: tok.convert_tokens_to_ids(v) for k, v in
             dict(audio_token_id="<|audio_pad|>", image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                  audio_start_token_id="<|audio_start|>", vision_start_token_id="<|vision_start|>").items()}
    if family == "qwen2.5-omni":
        rope = thinker["text_config"]["rope_parameters"]
        talker = dict(vocab_size=nc + 8, embedding_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_parameters=rope,
                      audio_token_index=vocab["audio_token_id"], image_token_index=vocab["image_token_id"],
                      video_token_index=vocab["video_token_id"], audio_start_token_id=vocab["audio_start_token_id"],
                      audio_end_token_id=ids("<|audio_end|>"), vision_start_token_id=vocab["vision_start_token_id"],
                      vision_end_token_id=ids("<|vision_end|>"), tts_text_start_token_id=ids("<|tts_bos|>"),
                      tts_text_end_token_id=ids("<|tts_eos|>"), tts_text_pad_token_id=ids("<|tts_pad|>"),
                      tts_codec_start_token_id=nc + 1, tts_codec_end_token_id=nc + 2, tts_codec_pad_token_id=nc,
                      tts_codec_mask_token_id=nc + 3)
        token2wav = dict(
            dit_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ff_mult=2, emb_dim=16,
                            head_dim=16, block_size=4, look_ahead_layers=[1], look_backward_layers=[0], repeats=2,
                            num_embeds=nc + 8, mel_dim=20, enc_emb_dim=16, enc_dim=16, enc_channels=[16, 16, 16, 16, 48],
                            enc_attention_channels=8, enc_se_channels=8),
            bigvgan_config=dict(mel_dim=20, upsample_initial_channel=32, resblock_kernel_sizes=[3],
                                resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[2, 2],
                                upsample_kernel_sizes=[4, 4]))
        model = transformers.Qwen2_5OmniForConditionalGeneration(transformers.Qwen2_5OmniConfig(
            thinker_config=thinker, talker_config=talker, token2wav_config=token2wav, enable_audio_output=True))
        model.speaker_map["Chelsie"] = {"bos_token": ids("<|voice|>"), "cond": torch.randn(1, 16),
                                        "ref_mel": torch.randn(1, 30, 20)}
        return model
    talker = dict(
        text_config=dict(vocab_size=nc + 1024, hidden_size=24, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=12, moe_intermediate_size=16,
                         shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 2, 2],
                                          "interleaved": True}),
        code_predictor_config=dict(vocab_size=nc, hidden_size=24, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=12, num_code_groups=4),
        num_code_groups=4, thinker_hidden_size=32, accept_hidden_layer=1, spatial_merge_size=2,
        codec_eos_token_id=nc, codec_pad_id=nc + 1, codec_bos_id=nc + 2, codec_nothink_id=nc + 3,
        codec_think_bos_id=nc + 4, codec_think_eos_id=nc + 5, speaker_id={"ethan": nc + 6}, **vocab)
    code2wav = dict(codebook_size=nc, num_quantizers=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, intermediate_size=32, decoder_dim=16, upsample_rates=(2, 2),
                    upsampling_ratios=(2,), sliding_window=8)
    model = transformers.Qwen3OmniMoeForConditionalGeneration(transformers.Qwen3OmniMoeConfig(
        thinker_config=thinker, talker_config=talker, code2wav_config=code2wav, enable_audio_output=True,
        im_start_token_id=ids("<|im_start|>"), im_end_token_id=ids("<|im_end|>"), user_token_id=ids("user"),
        assistant_token_id=ids("assistant"), tts_pad_token_id=ids("<|tts_pad|>"), tts_bos_token_id=ids("<|tts_bos|>"),
        tts_eos_token_id=ids("<|tts_eos|>")))
    with torch.no_grad():  # the random init leaves the Talker's expert weights as allocated (torch.empty)
        for layer in model.talker.model.layers:
            for p in layer.mlp.experts.parameters():
                p.normal_(0.0, 0.02)
    return model


def clips():
    rng = np.random.default_rng(0)
    return [{"audio": (0.1 * rng.standard_normal(n)).astype(np.float32), "text": t}
            for n, t in ((24_000, "What emotion does the speaker express?"), (4_321, "What?"),
                         (9_000, "Oh my God! <|audio_start|><|audio_pad|><|audio_end|> You're a genius."))]


def reference(adapter, clip):
    enc = adapter.processor(text=[adapter.prompt(clip["text"])], audio=[clip["audio"]], return_tensors="pt")
    with Recorder() as rec, torch.inference_mode():
        rec.pre(adapter.audio_tower.layers[0], "audio.embed")
        for L, layer in enumerate(adapter.audio_tower.layers):
            rec.post(layer, f"audio.blocks.{L}.resid_post")
            rec.post(layer.self_attn, f"audio.blocks.{L}.attn_out")
            rec.post(layer.fc2, f"audio.blocks.{L}.mlp_out")
        rec.pre(adapter.lm_layers[0], "thinker.embed")
        for L, layer in enumerate(adapter.lm_layers):
            rec.post(layer, f"thinker.blocks.{L}.resid_post")
            rec.post(layer.self_attn, f"thinker.blocks.{L}.attn_out")
            rec.post(layer.mlp, f"thinker.blocks.{L}.mlp_out")
        out = adapter.thinker(**enc, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[1], rec.out["thinker.blocks.0.resid_post"])  # hooks = the model's own
    ref = {k: (v if k.startswith("audio") else v[0]).numpy() for k, v in rec.out.items()}
    return ref, enc


@pytest.mark.parametrize("family", ["qwen3-omni", "qwen2.5-omni"])
def test_stored_sites_equal_the_models_own_forward_and_the_audio_span_is_indexed(family, monkeypatch, tmp_path):
    adapter = tiny(family, monkeypatch)
    data = clips()
    sites = [s for s in adapter.sites() if not s.startswith("vision")]
    store = extract_to_store(adapter, data, sites, tmp_path)
    refs = [reference(adapter, c) for c in data]
    stored_equals_reference(store, [r for r, _ in refs])
    audio_id = adapter.thinker.config.audio_token_id
    with Store(store) as s:
        for clip, (_, enc) in enumerate(refs):
            ids = enc["input_ids"][0].numpy()
            p = s.positions_of("thinker", clip)
            (kind, a, b), = [sp for sp in p.spans() if sp[0] == "audio"]
            assert np.flatnonzero(ids == audio_id).tolist() == list(range(a, b))
            n_mel = int(enc["feature_attention_mask"].sum())
            tower_t, token_t = audio_times(family, n_mel)
            np.testing.assert_allclose(p.time[a:b], token_t)
            np.testing.assert_allclose(s.positions_of("audio", clip).time, tower_t)
            assert p.token[a - 1] == "<|audio_start|>" and p.token[b] == "<|audio_end|>"
            tokens = adapter.processor.tokenizer.convert_ids_to_tokens(ids.tolist())
            assert p.token[p.select("text")].tolist() == [t for t, i in zip(tokens, ids) if i != audio_id]
    if family == "qwen3-omni":  # 13 tokens per second-long chunk, 8 mel frames (80 ms) apart
        np.testing.assert_allclose(audio_times(family, 150)[1], np.r_[np.arange(13) * 0.08, 1 + np.arange(7) * 0.08])


# --- the full model: Talker (and Qwen3-Omni's code predictor) sites -------------------------------
def speech_towers(adapter):
    return {"talker": (adapter.talker.model, adapter.talker_layers),
            **({"predictor": (adapter.talker.code_predictor.model, adapter.predictor_layers)}
               if adapter.predictor_layers is not None else {})}


def tower_sites(adapter, tower):
    return [s for s in adapter.sites() if s.startswith(tower + ".")]


@pytest.mark.parametrize("family", ["qwen3-omni", "qwen2.5-omni"])
def test_talker_sites_equal_the_talkers_own_hidden_states(family, monkeypatch):
    """A forward of each speech tower under the adapter's hooks: embed and every block's resid_post
    equal the tower's own output_hidden_states (the last block's through the tower's final norm,
    which the model applies before reporting it), attn_out / mlp_out a plain forward hook on the
    attention and feed-forward (MoE) modules."""
    adapter = tiny(family, monkeypatch, full=True)
    expected = {"qwen3-omni": {"talker": 2, "predictor": 2}, "qwen2.5-omni": {"talker": 2}}[family]
    assert {t: n for t, n in adapter.n_blocks.items() if t in ("talker", "predictor")} == expected
    torch.manual_seed(1)
    for tower, (lm, layers) in speech_towers(adapter).items():
        x = torch.randn(1, 4 if tower == "predictor" else 9, lm.config.hidden_size)
        sites = tower_sites(adapter, tower)
        assert len(sites) == 1 + 3 * len(layers)
        with torch.inference_mode(), Recorder() as rec, adapter.hooks(capture=sites) as cache:
            for L, layer in enumerate(layers):
                rec.post(layer.self_attn, f"{tower}.blocks.{L}.attn_out")
                rec.post(layer.mlp, f"{tower}.blocks.{L}.mlp_out")
            hs = lm(inputs_embeds=x, output_hidden_states=True, use_cache=False).hidden_states
        assert len(hs) == len(layers) + 1
        torch.testing.assert_close(cache[f"{tower}.embed"], hs[0])
        for L in range(len(layers) - 1):
            torch.testing.assert_close(cache[f"{tower}.blocks.{L}.resid_post"], hs[L + 1])
        with torch.inference_mode():
            torch.testing.assert_close(lm.norm(cache[f"{tower}.blocks.{len(layers) - 1}.resid_post"]), hs[-1])
        for site, want in rec.out.items():
            torch.testing.assert_close(cache[site], want)


@pytest.mark.parametrize("family", ["qwen3-omni", "qwen2.5-omni"])
def test_talker_sites_over_a_speech_generation_and_their_positions(family, monkeypatch):
    """Captured over a whole generate (prefill, then one row per step), every talker/predictor site
    holds exactly the rows the model's own forward hooks saw, in order, one per `talker_positions`
    row: the prompt-conditioned prefix (Qwen2.5-Omni: the whole prompt with the audio span at its
    token times; Qwen3-Omni: the user turn, then 9 assistant rows), then codec frames at k / rate.
    Qwen3-Omni's Talker rows also equal its own output_hidden_states step by step."""
    from affectlens.models.omni_generate import generate_speech

    adapter = tiny(family, monkeypatch, full=True)
    clip = clips()[0]
    sites = tower_sites(adapter, "talker") + tower_sites(adapter, "predictor")
    calls: dict[str, list] = {}
    with Recorder() as rec:
        for tower, (lm, layers) in speech_towers(adapter).items():
            for L, layer in enumerate(layers):
                rec.handles.append(layer.register_forward_hook(
                    lambda m, a, o, name=f"{tower}.blocks.{L}.resid_post":
                        calls.setdefault(name, []).append(o[0] if isinstance(o, tuple) else o)))
        talker_steps = []  # the model's own hidden states, per step (Qwen3-Omni's Talker reports them)
        if family == "qwen3-omni":
            rec.handles.append(adapter.talker.register_forward_hook(
                lambda m, a, out: talker_steps.append(out.hidden_states[0])))
        speech = generate_speech(adapter, clip, capture=sites, max_codes=6, min_codes=6, max_answer_tokens=4)
    n_rows = len(speech.positions["talker"])
    for site in sites:
        tower = site.split(".")[0]
        assert speech.activations[site].shape[0] == len(speech.positions[tower]), site
    for name, parts in calls.items():
        np.testing.assert_allclose(speech.activations[name], torch.cat(parts, 1)[0].numpy(), atol=1e-5, rtol=1e-5)
    if family == "qwen3-omni":
        for L in range(len(adapter.talker_layers) - 1):
            own = torch.cat([step[L + 1] for step in talker_steps], 1)[0].numpy()
            np.testing.assert_allclose(speech.activations[f"talker.blocks.{L}.resid_post"], own, atol=1e-5)
    # positions: the prefix, then one row per code fed back (6 generated, the last never fed back)
    p, rate = speech.positions["talker"], speech.codec_rate
    codes = p.select("code")
    assert len(codes) == 5 and codes.tolist() == list(range(n_rows - 5, n_rows))
    np.testing.assert_allclose(p.time[codes], np.arange(5) / rate)
    enc = adapter.processor(text=[adapter.prompt(clip["text"])], audio=[clip["audio"]], return_tensors="pt")
    ids = enc["input_ids"][0].numpy()
    _, token_t = audio_times(family, int(enc["feature_attention_mask"].sum()))
    audio = p.select("audio")
    np.testing.assert_allclose(p.time[audio], token_t)
    assert len(audio) == int((ids == adapter.thinker.config.audio_token_id).sum())
    tok = adapter.processor.tokenizer
    reply = tok.convert_ids_to_tokens(speech.answer.tokens[:1])
    if family == "qwen2.5-omni":
        assert n_rows == len(ids) + 2 + 5 and speech.codes.ndim == 1
        prompt_tokens = [t if i != adapter.thinker.config.audio_token_id else "" for t, i in
                         zip(tok.convert_ids_to_tokens(ids.tolist()), ids)]
        assert p.token[:len(ids)].tolist() == prompt_tokens
        assert p.token[len(ids):len(ids) + 2].tolist() == ["<|voice|>", *reply]
        assert rate == 24000 / (2 * 4)  # DiT repeats x BigVGAN upsampling of the tiny config
    else:
        user_turn = len(ids) - 3  # the prompt is "<|im_start|>user ... <|im_end|>\n" + "<|im_start|>assistant\n"
        assert n_rows == user_turn + 9 + 5
        assert p.token[user_turn:user_turn + 3].tolist() == ["<|im_start|>", "assistant", "Ċ"]
        assert p.token[user_turn + 8] == f"{reply[0]}+codec_bos"
        q = speech.positions["predictor"]
        assert len(q) == 5 * 4 and speech.codes.shape == (5, 4)
        np.testing.assert_allclose(q.time, np.repeat(np.arange(5) / rate, 4))
        assert q.token[:4].tolist() == ["talker_state", "codebook_0", "codebook_1", "codebook_2"]
        assert rate == 24000 / (2 * 2 * 2)  # code2wav's total upsampling of the tiny config


SPEECH = {"max_answer_tokens": 4, "max_codes": 6, "min_codes": 6}  # 6 codes: 5 code rows, whatever the weights


def speaking(family, monkeypatch, **settings):
    """The tiny full model with short, fixed-length speech for extraction."""
    adapter = tiny(family, monkeypatch, full=True)
    adapter.generation_settings.update({**SPEECH, **settings})
    return adapter


@pytest.mark.parametrize("family", ["qwen3-omni", "qwen2.5-omni"])
def test_stored_talker_sites_are_the_generation_runs_rows_and_thinker_sites_stay_the_prompt_forward(
        family, monkeypatch, tmp_path):
    """A store of Talker (and predictor) sites with Thinker and audio sites beside them: each clip's
    speech rows are what `generate_speech` captures for the clip alone (test above: the towers' own
    states), its positions `talker_positions` (prefix, then code rows at k / codec_rate), its pooled
    mean the mean over the code rows; the Thinker and audio rows are those of a store without
    speech sites (the prompt forward, batched), untouched by the generation run's own Thinker pass."""
    from affectlens.models.omni_generate import generate_speech

    adapter = speaking(family, monkeypatch)
    data = clips()[:2]
    speech_sites = tower_sites(adapter, "talker") + tower_sites(adapter, "predictor")
    prompt_sites = ["audio.blocks.1.resid_post", "thinker.embed", "thinker.blocks.1.resid_post"]
    both = extract_to_store(adapter, data, prompt_sites + speech_sites, tmp_path / "both")
    alone = extract_to_store(adapter, data, prompt_sites, tmp_path / "alone")
    with Store(both) as s, Store(alone) as ref:
        assert set(s.sites) == set(prompt_sites + speech_sites)
        for site in prompt_sites:
            for clip in range(len(data)):
                np.testing.assert_array_equal(s.clip_frames(site, clip), ref.clip_frames(site, clip), err_msg=site)
            np.testing.assert_array_equal(s.pooled(site), ref.pooled(site))
        for tower in ("thinker", "audio"):
            for clip in range(len(data)):
                np.testing.assert_array_equal(s.positions_of(tower, clip).time, ref.positions_of(tower, clip).time)
        for clip, item in enumerate(data):
            speech = generate_speech(adapter, item, capture=speech_sites, **SPEECH)  # decoded: the same rows
            assert speech.wave is not None and len(speech.codes) == (6 if family == "qwen2.5-omni" else 5)
            for tower, want in speech.positions.items():
                got = s.positions_of(tower, clip)
                assert got.kind.tolist() == want.kind.tolist() and got.token.tolist() == want.token.tolist()
                np.testing.assert_array_equal(got.time, want.time)
                np.testing.assert_array_equal(got.frame, want.frame)
                assert len(got.select("code")) == 5 * (4 if tower == "predictor" else 1)
            for site in speech_sites:
                rows = speech.activations[site]
                code = speech.positions[site.split(".")[0]].select("code")
                np.testing.assert_array_equal(s.clip_frames(site, clip), rows, err_msg=site)
                np.testing.assert_allclose(s.pooled(site)[clip], rows[code].mean(0), rtol=1e-6, atol=1e-7)
                np.testing.assert_allclose(s.pooled(site)[clip], s.pooled(site, kind="code")[clip], rtol=1e-6,
                                           atol=1e-7)
                if site.startswith("talker"):  # the prefix is stored, but not pooled
                    assert len(code) < len(rows)
                    assert not np.allclose(s.pooled(site)[clip], rows.mean(0))


def test_talker_extraction_follows_the_speech_settings_and_says_when_there_is_nothing_to_pool(
        monkeypatch, tmp_path):
    """The speech settings define the stored rows (and the store's config digest); a clip whose
    Talker feeds back no code has no code rows, and the error names the clip and the key to raise."""
    adapter = speaking("qwen2.5-omni", monkeypatch)
    data = clips()[1:2]
    first = extract_to_store(adapter, data, ["talker.embed"], tmp_path / "a")
    adapter.generation_settings.update(max_codes=3, min_codes=3)
    shorter = extract_to_store(adapter, data, ["talker.embed"], tmp_path / "b")
    with Store(first) as a, Store(shorter) as b:
        assert len(a.positions_of("talker", 0).select("code")) == 5
        assert len(b.positions_of("talker", 0).select("code")) == 2
        np.testing.assert_array_equal(b.clip_frames("talker.embed", 0), a.clip_frames("talker.embed", 0)[:-3])
        assert a.attrs["config_digest"] != b.attrs["config_digest"]
    adapter.generation_settings.update(max_codes=1, min_codes=0)
    with pytest.raises(ValueError, match="clip clip0: the Talker wrote no codec frame.*speech_min_codes"):
        extract_to_store(adapter, data, ["talker.embed"], tmp_path / "c")


def test_codec_rates_of_the_released_configs():
    """Default (released) decoder configs: Qwen2.5-Omni 50 codes/s, Qwen3-Omni 12.5 frames/s."""
    from types import SimpleNamespace

    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniToken2WavConfig
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeCode2WavConfig

    from affectlens.models.qwen_omni import codec_rate

    q25 = SimpleNamespace(token2wav=SimpleNamespace(config=Qwen2_5OmniToken2WavConfig()))
    q3 = SimpleNamespace(code2wav=SimpleNamespace(config=Qwen3OmniMoeCode2WavConfig()))
    assert codec_rate(q25) == 50.0 and codec_rate(q3) == 12.5


def test_talker_towers_need_the_full_model_and_wrong_ones_say_why(monkeypatch, tmp_path):
    from affectlens.models.sites import SiteError

    thinker_only = tiny("qwen3-omni", monkeypatch)
    assert "talker" not in thinker_only.n_blocks and "predictor" not in thinker_only.n_blocks
    with pytest.raises(SiteError, match="Thinker alone.*talker=True"):
        with thinker_only.hooks(capture=["talker.blocks.0.resid_post"]):
            pass
    q25 = tiny("qwen2.5-omni", monkeypatch, full=True)
    with pytest.raises(SiteError, match="no code predictor"):
        with q25.hooks(interventions={"predictor.embed": lambda a, s: a}):
            pass
    with pytest.raises(SiteError, match="unknown tower 'talkr'"):
        with q25.hooks(capture=["talkr.embed"]):
            pass
    with pytest.raises(SiteError, match="past the model's depth"):
        q25.sites(["talker.blocks.2.resid_post"])
    with pytest.raises(SiteError, match="past the model's depth"):
        with q25.hooks(capture=["talker.blocks.2.resid_post"]):
            pass
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in q25.talker_layers)
    # patching runs `forward` (the Thinker over the prompt), which never reaches the Talker: refused
    batch = q25.prepare(clips()[:1])
    with pytest.raises(ValueError, match="runs only while speech is generated.*cannot be patched"):
        q25.run(batch, interventions={"talker.blocks.0.resid_post": lambda a, s: a})
    with pytest.raises(ValueError, match="read by `forward`"):
        q25.generated_rows(clips()[0], ["thinker.embed"])
    with pytest.raises(ValueError, match="speech settings.*max_code"):
        QwenOmniAdapter(q25.model, "x", family="qwen2.5-omni", processor=q25.processor, speech={"max_code": 3})


@pytest.mark.parametrize("family", ["qwen3-omni", "qwen2.5-omni"])
def test_from_source_loads_the_full_model_only_when_talker_towers_are_asked_for(family, monkeypatch):
    """The class handed to from_pretrained: the Thinker alone by default and for Thinker sites; the
    full model for talker/predictor towers (as the workflow passes the configured sites' towers) or
    talker=True; a checkpoint without a Talker is refused."""
    from affectlens.models import load_adapter, qwen_omni

    full_cls, thinker_cls = qwen_omni._classes(family)
    built = {full_cls: tiny(family, monkeypatch, full=True), thinker_cls: tiny(family, monkeypatch)}
    asked = []

    def fake_load(cls, source, revision, dtype, device, device_map):
        asked.append(cls)
        model = built[cls]
        return (model.model if cls is full_cls else model.thinker), "rev", source

    monkeypatch.setattr(qwen_omni, "load_pretrained", fake_load)
    monkeypatch.setattr(qwen_omni, "load_processor", lambda cls, where, revision: built[thinker_cls].processor)
    assert "talker" not in load_adapter(family, "org/omni").n_blocks
    assert "talker" not in load_adapter(family, "org/omni", towers=["audio", "thinker"]).n_blocks
    assert "talker" in load_adapter(family, "org/omni", towers=["thinker", "talker"]).n_blocks
    assert "talker" in qwen_omni.QwenOmniAdapter.from_source("org/omni", family=family, talker=True).n_blocks
    assert asked == [thinker_cls, thinker_cls, full_cls, full_cls]
    assert qwen_omni.QwenOmniAdapter.from_source("org/omni", family=family).generation_settings == {
        "speaker": None, "max_answer_tokens": 32, "max_codes": 512, "min_codes": 0}
    voiced = qwen_omni.QwenOmniAdapter.from_source("org/omni", family=family, talker=True, speaker="Chelsie",
                                                   speech_max_answer_tokens=8, speech_max_codes=100, speech_min_codes=2)
    assert voiced.generation_settings == {"speaker": "Chelsie", "max_answer_tokens": 8, "max_codes": 100,
                                          "min_codes": 2}
    assert set(qwen_omni.QwenOmniAdapter.config_keys) == {"speaker", "speech_max_answer_tokens", "speech_max_codes",
                                                          "speech_min_codes"}
    built[full_cls].model.has_talker = False
    with pytest.raises(ValueError, match="no Talker"):
        qwen_omni.QwenOmniAdapter.from_source("org/omni", family=family, towers=("talker",))


def test_edits_reach_the_hidden_states_the_model_records_whatever_ran_before(monkeypatch):
    """transformers records output_hidden_states with hooks of its own, installed at the first such
    call; the full model builds the Talker's input from those records. The adapter's hooks run
    first, so a steered block's recorded state is the steered one also after an earlier call."""
    adapter = tiny("qwen3-omni", monkeypatch, full=True)
    batch = adapter.prepare(clips()[1:2])
    site = "thinker.blocks.0.resid_post"
    shift = torch.full((adapter.thinker.config.get_text_config().hidden_size,), 5.0)
    with torch.inference_mode():
        plain = adapter.thinker(**batch.inputs, output_hidden_states=True).hidden_states[1]  # installs the recorders
        with adapter.hooks({site: lambda act, s: act + shift}, capture=[site]) as cache:
            steered = adapter.thinker(**batch.inputs, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(steered, cache[site])
    torch.testing.assert_close(steered, plain + shift)
