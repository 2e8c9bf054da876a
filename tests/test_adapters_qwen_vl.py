"""Qwen2-VL and Qwen2.5-VL on tiny random-init configs of the real transformers classes, through
the real Qwen2VLProcessor with its PIL image processor and a small BPE vocabulary: the image span
is indexed exactly, and every stored vision-tower and LM site equals the model's own forward on
the clip alone. Video goes through the adapter's own patchify (transformers' video processor needs
torchvision, not installable beside this CPU torch); it is checked against the model's invariants:
a repeated frame is the image path's patches, video_grid_thw and the <|video_pad|> count agree,
the model's temporal rotary index and its vision tower agree with each token's frame. The
comparison with the real video processor runs where torchvision is installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.processing_utils import ProcessorMixin

from affectlens.models.qwen_vl import QwenVLAdapter
from affectlens.store import Store
from test_adapters_common import Recorder, extract_to_store, stored_equals_reference, tiny_bpe

torch.set_num_threads(1)
SPECIAL = {"vision_bos_token": "<|vision_start|>", "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
           "vision_eos_token": "<|vision_end|>"}


def tiny(family, monkeypatch, video_processor=None):
    tok = tiny_bpe(list(SPECIAL.values()))
    tok = transformers.Qwen2Tokenizer(tokenizer_object=tok.backend_tokenizer, eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>", extra_special_tokens=SPECIAL)
    with monkeypatch.context() as m:
        if video_processor is None:  # the slot's type check would import torchvision
            m.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
        proc = transformers.Qwen2VLProcessor(image_processor=transformers.Qwen2VLImageProcessor(patch_size=14, merge_size=2),
                                             video_processor=video_processor, tokenizer=tok)
    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, rope_parameters=rope)
    ids = dict(image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
               vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"))
    if family == "qwen2-vl":
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=dict(
            depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14), **ids)
        model = transformers.Qwen2VLForConditionalGeneration(config)
    else:
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32, patch_size=14,
            window_size=56, fullatt_block_indexes=[1]), **ids)
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    return QwenVLAdapter(model.eval(), f"tiny-{family}", family=family, processor=proc)


def clips():
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "text": t}
            for (h, w), t in (((56, 84), "Describe the video."), ((112, 56), "What?"), ((56, 56), "Oh my God!"))]


def reference(adapter, clip):
    enc = adapter.processor(text=[adapter.prompt(clip["text"], "image")], images=[clip["image"]], return_tensors="pt")
    with Recorder() as rec, torch.inference_mode():
        rec.pre(adapter.visual.blocks[0], "vision.embed")
        for L, block in enumerate(adapter.visual.blocks):
            rec.post(block, f"vision.blocks.{L}.resid_post")
            rec.post(block.attn, f"vision.blocks.{L}.attn_out")
            rec.post(block.mlp, f"vision.blocks.{L}.mlp_out")
        rec.pre(adapter.lm_layers[0], "decoder.embed")
        for L, layer in enumerate(adapter.lm_layers):
            rec.post(layer, f"decoder.blocks.{L}.resid_post")
            rec.post(layer.self_attn, f"decoder.blocks.{L}.attn_out")
            rec.post(layer.mlp, f"decoder.blocks.{L}.mlp_out")
        adapter.model(**enc)
    return {k: (v if k.startswith("vision") else v[0]).numpy() for k, v in rec.out.items()}, enc


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl"])
def test_stored_sites_equal_the_models_own_forward_and_the_image_span_is_indexed(family, monkeypatch, tmp_path):
    adapter = tiny(family, monkeypatch)
    data = clips()
    store = extract_to_store(adapter, data, adapter.sites(), tmp_path)
    refs = [reference(adapter, c) for c in data]
    stored_equals_reference(store, [r for r, _ in refs])
    image_id = adapter.model.config.image_token_id
    with Store(store) as s:
        for clip, (_, enc) in enumerate(refs):
            ids = enc["input_ids"][0].numpy()
            t, h, w = enc["image_grid_thw"][0].tolist()
            p = s.positions_of("decoder", clip)
            (kind, a, b), = [sp for sp in p.spans() if sp[0] == "image"]
            assert np.flatnonzero(ids == image_id).tolist() == list(range(a, b)) and b - a == t * h * w // 4
            assert p.token[a - 1] == "<|vision_start|>" and p.token[b] == "<|vision_end|>"
            v = s.positions_of("vision", clip)
            assert len(v) == t * h * w and set(v.kind) == {"image"}


def video(n_frames, seed=0, size=(56, 84)):
    rng = np.random.default_rng(seed)
    return {"frames": rng.integers(0, 255, (n_frames, *size, 3), dtype=np.uint8), "times": np.arange(n_frames) * 0.5}


def test_video_patches_are_the_image_processors_patches_grouped_in_time(monkeypatch):
    adapter = tiny("qwen2-vl", monkeypatch)
    frames = video(4)["frames"]
    image_path = [adapter.processor.image_processor(images=[f], return_tensors="pt") for f in frames]
    p, hw = 14, 4 * 6
    # A video of one frame repeated is the image of that frame (the image path repeats it in time itself).
    pixels, grid = adapter.video_pixels(np.stack([frames[1], frames[1]]))
    assert grid == (1, 4, 6)
    torch.testing.assert_close(pixels, image_path[1]["pixel_values"], rtol=0, atol=0)
    # Distinct frames: time slot j of temporal patch k holds frame 2k + j, patch for patch.
    pixels, grid = adapter.video_pixels(frames)
    assert grid == (2, 4, 6) and pixels.shape == (2 * hw, 3 * 2 * p * p)
    slots = pixels.reshape(2, hw, 3, 2, p, p)
    for k in range(2):
        for j in range(2):
            want = image_path[2 * k + j]["pixel_values"].reshape(hw, 3, 2, p, p)[:, :, 0]
            torch.testing.assert_close(slots[k, :, :, j], want, rtol=0, atol=0)
    # An odd frame count is padded with the last frame, as the video processor does.
    odd, grid = adapter.video_pixels(frames[:3])
    assert grid == (2, 4, 6)
    torch.testing.assert_close(odd.reshape(2, hw, 3, 2, p, p)[1, :, :, 1], slots[1, :, :, 0], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl"])
def test_video_tokens_are_indexed_per_frame_and_agree_with_the_models_rope_and_vision_tower(family, monkeypatch):
    adapter = tiny(family, monkeypatch)
    videos = [{"video": video(8, seed=1), "text": "What happens first?"},
             {"video": video(4, seed=2), "text": "Why?"}]
    batch = adapter.prepare(videos)
    grids = batch.inputs["video_grid_thw"].tolist()
    assert grids == [[4, 4, 6], [2, 4, 6]]
    out, cache = adapter.run(batch, capture=["decoder.embed"])
    assert torch.isfinite(out).all()
    inputs = {k: v for k, v in batch.inputs.items() if k not in ("pixel_values_videos",)}
    rope, _ = adapter.model.model.get_rope_index(**inputs)  # [3, batch, token]: temporal, height, width
    video_id = adapter.model.config.video_token_id
    for i, (clip, (t, h, w)) in enumerate(zip(videos, grids)):
        p = batch.positions["decoder"][i]
        ids = batch.inputs["input_ids"][i].numpy()
        rows = p.select("video")
        assert p.index[rows].tolist() == np.flatnonzero(ids == video_id).tolist() and len(rows) == t * h * w // 4
        assert p.token[rows[0] - 1] == "<|vision_start|>" and p.token[rows[-1] + 1] == "<|vision_end|>"
        temporal = rope[0, i].numpy()
        step = None
        for k in range(t):
            frame_rows = p.index[p.select("video", frames=(k, k))]
            assert len(frame_rows) == h * w // 4
            np.testing.assert_array_equal(p.time[p.select("video", frames=(k, k))], clip["video"]["times"][2 * k])
            # The model's own temporal rotary index is one value per frame, rising frame by frame.
            assert len(set(temporal[frame_rows])) == 1
            if k == 1:
                step = temporal[frame_rows[0]] - temporal[p.index[p.select("video", frames=(0, 0))][0]]
            if k:
                assert temporal[frame_rows[0]] - temporal[p.index[p.select("video", frames=(0, 0))][0]] == k * step > 0
            # The LM rows called frame k hold the vision tower's output for those two frames alone.
            alone, grid = adapter.video_pixels(clip["video"]["frames"][2 * k:2 * k + 2])
            with torch.inference_mode():
                feats = adapter.model.model.get_video_features(alone, torch.tensor([grid]), return_dict=True)
            torch.testing.assert_close(cache["decoder.embed"][i, frame_rows], torch.cat(feats.pooler_output),
                                       atol=1e-5, rtol=1e-5)
        # Qwen2-VL steps one rotary index per temporal patch; Qwen2.5-VL spaces them by time:
        # tokens_per_second x the 2 frames' span (2 x 0.5 s here).
        per_second = getattr(adapter.model.config.vision_config, "tokens_per_second", None)
        assert step == (1 if family == "qwen2-vl" else int(per_second * 2 * 0.5))
        # Padding never reaches real tokens: the batch equals the clip alone.
        single = adapter.prepare([clip])
        logits = adapter.forward(single)[0]
        torch.testing.assert_close(out[i, :len(p)], logits[:len(p)], atol=1e-4, rtol=1e-4)


def test_decoder_run_from_skips_the_vision_tower_and_matches_the_full_run(monkeypatch):
    adapter = tiny("qwen2-vl", monkeypatch)
    batch = adapter.prepare([{"video": video(4), "text": "Why?"}])
    full, cache = adapter.run(batch, capture=["decoder.blocks.0.resid_post"])
    calls = []
    handle = adapter.visual.register_forward_hook(lambda *a: calls.append(1))
    try:
        resumed, _ = adapter.run_from(batch, "decoder.blocks.0.resid_post", cache["decoder.blocks.0.resid_post"])
    finally:
        handle.remove()
    assert calls == []
    torch.testing.assert_close(resumed, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_a_repeated_batch_runs_each_clip_as_if_prepared_that_many_times(kind, monkeypatch):
    """Batch.repeat (batched patching) on a batch whose patches of all clips are concatenated:
    the vision rows are repeated clip by clip, so the run equals preparing the repeated clips."""
    adapter = tiny("qwen2-vl", monkeypatch)
    items = ([{"video": video(4, seed=s), "text": t} for s, t in ((0, "Why?"), (1, "Who is it?"))] if kind == "video"
             else clips()[:2])
    repeated, _ = adapter.run(adapter.prepare(items).repeat(3), capture=["vision.blocks.0.resid_post"])
    direct, _ = adapter.run(adapter.prepare([c for c in items for _ in range(3)]), capture=["vision.blocks.0.resid_post"])
    torch.testing.assert_close(repeated, direct, atol=1e-5, rtol=1e-5)


def test_video_path_equals_transformers_video_processor(monkeypatch):
    pytest.importorskip("torchvision")
    vp = transformers.Qwen2VLVideoProcessor(patch_size=14, merge_size=2, size={"shortest_edge": 56 * 56,
                                                                               "longest_edge": 28 * 28 * 1280})
    adapter = tiny("qwen2-vl", monkeypatch, video_processor=vp)
    frames = video(8)["frames"]
    want = vp(videos=[frames], return_tensors="pt")
    pixels, grid = adapter.video_pixels(frames)
    assert list(grid) == want["video_grid_thw"][0].tolist()
    torch.testing.assert_close(pixels, want["pixel_values_videos"], atol=2e-2, rtol=0)  # PIL vs torchvision resize


def test_a_saved_model_loads_and_runs_video_without_torchvision(monkeypatch, tmp_path):
    """from_source on a model folder: where the full processor cannot load (its video slot needs
    torchvision), the adapter takes the tokenizer and image processor and runs the same forward."""
    adapter = tiny("qwen2-vl", monkeypatch)
    adapter.model.save_pretrained(tmp_path)
    adapter.processor.tokenizer.save_pretrained(tmp_path)
    adapter.processor.image_processor.save_pretrained(tmp_path)
    loaded = QwenVLAdapter.from_source(str(tmp_path), family="qwen2-vl")
    clip = {"video": video(4), "text": "Why?"}
    a, b = adapter.prepare([clip]), loaded.prepare([clip])
    assert torch.equal(a.inputs["input_ids"], b.inputs["input_ids"])
    torch.testing.assert_close(loaded.forward(b), adapter.forward(a), atol=1e-5, rtol=1e-5)
