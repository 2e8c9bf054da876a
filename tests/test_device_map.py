"""`device_map`: a model dispatched by accelerate (here: blocks offloaded to disk, the only second
device a CPU machine has) gives the same activations at every site, and steering edits reach the
blocks after them, through our hooks beside accelerate's own (which move weights in and out)."""

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2FeatureExtractor

from affectlens.models import load_adapter
from affectlens.steering.vectors import add_vector
from test_adapters_speech import tiny as tiny_speech
from test_workflow import tiny_whisper

WAVE = (0.1 * np.sin(2 * np.pi * 200 * np.arange(16000) / 16000)).astype(np.float32)


def whisper_folder(folder):
    return tiny_whisper(folder), {
        "model.encoder.conv1": "cpu", "model.encoder.conv2": "cpu", "model.encoder.embed_positions": "cpu",
        "model.encoder.layers.0": "cpu", "model.encoder.layers.1": "disk", "model.encoder.layer_norm": "cpu",
        "model.decoder": "disk", "proj_out": "disk"}  # proj_out is tied to the decoder's embedding


def wav2vec2_folder(folder):
    adapter = tiny_speech("wav2vec2-base")
    adapter.model.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(folder)
    names = [n for n, _ in adapter.model.named_children()] + [n for n, _ in adapter.model.named_parameters(recurse=False)]
    dm = {n: "cpu" for n in names if n != "encoder"}
    dm |= {"encoder.pos_conv_embed": "cpu", "encoder.layer_norm": "cpu", "encoder.layers.0": "cpu",
           "encoder.layers.1": "disk"}
    return folder, dm


@pytest.mark.parametrize("family, build", [("whisper", whisper_folder), ("wav2vec2", wav2vec2_folder)])
def test_disk_offloaded_blocks_give_the_same_activations_and_steering(family, build, tmp_path, monkeypatch):
    monkeypatch.setenv("AFFECTLENS_OFFLOAD_DIR", str(tmp_path / "offload"))
    folder, device_map = build(tmp_path / "model")
    plain = load_adapter(family, str(folder))
    dispatched = load_adapter(family, str(folder), device_map=device_map)
    offloaded = next(k for k, v in device_map.items() if v == "disk" and "layers" in k)
    assert dispatched.model.hf_device_map[offloaded] == "disk"
    # its weights stay off the module (read from the safetensors file when it runs)
    assert {p.device.type for p in dispatched.model.get_submodule(offloaded).parameters()} == {"meta"}
    sites = ["encoder.embed", "encoder.blocks.0.resid_post", "encoder.blocks.1.resid_post"]
    _, a = plain.run(plain.prepare([WAVE]), capture=sites)
    _, b = dispatched.run(dispatched.prepare([WAVE]), capture=sites)
    for s in sites:
        torch.testing.assert_close(b[s], a[s], rtol=0, atol=1e-6)
    v = np.ones(a[sites[1]].shape[-1], np.float32)
    edit = {sites[1]: add_vector(v, 1.0)}
    _, sa = plain.run(plain.prepare([WAVE]), capture=sites[2:], interventions=edit)
    _, sb = dispatched.run(dispatched.prepare([WAVE]), capture=sites[2:], interventions=edit)
    torch.testing.assert_close(sb[sites[2]], sa[sites[2]], rtol=0, atol=1e-6)
    assert (sa[sites[2]] - a[sites[2]]).abs().max() > 1e-3  # the edit reached the offloaded block
