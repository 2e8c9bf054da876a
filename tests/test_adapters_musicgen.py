"""MusicGen on a tiny random-init config of the real transformers classes (T5 text encoder,
EnCodec, audio-token decoder) with the real MusicgenProcessor parts: every stored text and decoder
site equals the model's own forward on the clip alone (teacher-forcing the clip's own codes in
the delay pattern), and interventions steer every step of generate()."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from affectlens.models.musicgen import MusicgenAdapter
from affectlens.store import Store
from test_adapters_common import Recorder, extract_to_store, stored_equals_reference

torch.set_num_threads(1)
TEXTS = ["happy upbeat pop with guitar", "sad slow piano", "calm ambient pads, soft and slow"]


@pytest.fixture(scope="module")
def adapter():
    return make_adapter()


def make_adapter():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(TEXTS * 5, trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"]))
    t5_tok = transformers.T5Tokenizer(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                      extra_ids=0)
    processor = transformers.MusicgenProcessor(feature_extractor=transformers.EncodecFeatureExtractor(sampling_rate=32000),
                                               tokenizer=t5_tok)
    torch.manual_seed(0)
    config = transformers.MusicgenConfig(
        text_encoder=transformers.T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                           num_heads=2).to_dict(),
        audio_encoder=transformers.EncodecConfig(sampling_rate=32000, num_filters=4, codebook_size=16, codebook_dim=8,
                                                 hidden_size=8, upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[0.8],
                                                 num_lstm_layers=1).to_dict(),
        decoder=transformers.MusicgenDecoderConfig(vocab_size=16, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, ffn_dim=48, num_codebooks=4,
                                                   pad_token_id=16, bos_token_id=16).to_dict())
    model = transformers.MusicgenForConditionalGeneration(config).eval()
    with torch.no_grad():  # EnCodec's codebooks are buffers that start at zero (a checkpoint fills them):
        for layer in model.audio_encoder.quantizer.layers:  # give every code its own vector, as trained ones have
            layer.codebook.embed.normal_()
    model.generation_config.decoder_start_token_id = model.generation_config.pad_token_id = 16
    return MusicgenAdapter(model, "tiny-musicgen", processor=processor)


def clips():
    rng = np.random.default_rng(0)
    return [{"audio": (0.2 * rng.standard_normal(n)).astype(np.float32), "text": t}
            for n, t in zip((8_000, 3_000, 5_500), TEXTS)]


def reference(adapter, clip):
    text = adapter.processor.tokenizer([clip["text"]], return_tensors="pt")
    ids = adapter.delayed(adapter.codes(clip["audio"]))
    with Recorder() as rec, torch.inference_mode():
        for tower, stack, attn, mlp in (("text", adapter.t5_blocks, lambda b: b.layer[0].SelfAttention,
                                         lambda b: b.layer[-1].DenseReluDense),
                                        ("decoder", adapter.decoder_layers, lambda b: b.self_attn, lambda b: b.fc2)):
            for L, block in enumerate(stack):
                rec.post(block, f"{tower}.blocks.{L}.resid_post")
                rec.post(attn(block), f"{tower}.blocks.{L}.attn_out")
                rec.post(mlp(block), f"{tower}.blocks.{L}.mlp_out")
        out = adapter.model(**text, decoder_input_ids=ids, output_hidden_states=True, use_cache=False)
    ref = dict(rec.out)
    ref["text.embed"], ref["decoder.embed"] = out.encoder_hidden_states[0], out.decoder_hidden_states[0]
    torch.testing.assert_close(out.decoder_hidden_states[1], rec.out["decoder.blocks.0.resid_post"])
    return {k: v[0].numpy() for k, v in ref.items()}, text, ids


def test_stored_sites_equal_the_models_own_forward_teacher_forcing_the_clip(adapter, tmp_path):
    data = clips()
    store = extract_to_store(adapter, data, adapter.sites(), tmp_path)
    refs = [reference(adapter, c) for c in data]
    stored_equals_reference(store, [r for r, *_ in refs])
    with Store(store) as s:
        assert s.n_frames_of("decoder").tolist() == [29, 14, 22]  # start + 25/10/18 frames at 50/s + 3 delays
        for clip, (_, text, ids) in enumerate(refs):
            p = s.positions_of("decoder", clip)
            assert p.token[0] == "<bos>" and set(p.kind) == {"code"}
            np.testing.assert_allclose(p.time[1:4], [0, 0.02, 0.04])
            assert s.positions_of("text", clip).token.tolist() == adapter.processor.tokenizer.convert_ids_to_tokens(
                text["input_ids"][0].tolist())


def test_interventions_steer_every_step_of_generate(adapter):
    calls = []
    direction = 4.0 * torch.randn(32, generator=torch.Generator().manual_seed(1))  # not a constant: norms remove those

    def push(h, site):
        calls.append(h.shape[1])
        return h + direction

    kw = dict(max_new_tokens=6, do_sample=False, guidance_scale=1.0, return_dict_in_generate=True, output_scores=True)
    plain = adapter.generate(["sad slow piano"], **kw)
    steered = adapter.generate(["sad slow piano"], {"decoder.blocks.1.resid_post": push}, **kw)
    assert len(plain.scores) == len(steered.scores) == 6
    # every generated step's code distribution moved (the random tiny codec decodes every code alike,
    # so the step scores, not the audio, show the steering)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(plain.scores, steered.scores))
    assert calls == [1] * 7  # the start token, then one pass per generated step over its newest position
    again = adapter.generate(["sad slow piano"], **kw)
    assert all(torch.equal(a, b) for a, b in zip(again.scores, plain.scores))  # hooks removed after generate
