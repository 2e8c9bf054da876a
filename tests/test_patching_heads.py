"""Head-level patching, known answer: a tiny random-init Whisper (the real transformers class)
in which one attention head alone carries the clean/corrupt contrast to the probe, by
construction. Patching that head lights up alone, in both directions and both maps; its time
windows add up to its whole-clip effect; attribution patching agrees (the metric is linear in the
head's output); the heatmaps stage draws the maps under the names the UI reads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from affectlens.models.whisper import WhisperAdapter
from affectlens.patching.heads import attribute_heads_pair, head_cells, head_setter, patch_heads_pair, summarise_heads
from affectlens.patching.patch import ProbeLogitDiff, patch_pair, summarise, time_windows

torch.set_num_threads(1)
D, N_HEADS, D_HEAD, BLOCKS = 32, 4, 8, 3
CHANNEL, BLOCK, HEAD = 5, 1, 2  # the residual channel the probe reads, and the one head that writes it
READOUT = f"encoder.blocks.{BLOCKS - 1}.resid_post"
HEADS = {f"encoder.blocks.{L}.attn_heads": N_HEADS for L in range(BLOCKS)}


def planted_whisper() -> WhisperAdapter:
    """Random Whisper weights, then: nothing writes residual channel CHANNEL (conv stem,
    positions, every output projection and second linear have a zero row there) except head HEAD
    of block BLOCK, whose columns of the output projection get a random row. Block 0's attention
    writes nothing at all, so no head before BLOCK changes what HEAD reads. The probe reading
    CHANNEL of the last block's output then sees the input only through HEAD of BLOCK."""
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=100, d_model=D, encoder_layers=BLOCKS, decoder_layers=1,
                        encoder_attention_heads=N_HEADS, decoder_attention_heads=N_HEADS, encoder_ffn_dim=2 * D,
                        decoder_ffn_dim=2 * D, max_source_positions=100, max_target_positions=20, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    model = WhisperForConditionalGeneration(cfg).eval()
    enc = model.get_encoder()
    with torch.no_grad():
        enc.conv2.weight[CHANNEL] = 0
        enc.conv2.bias[CHANNEL] = 0
        enc.embed_positions.weight[:, CHANNEL] = 0
        for layer in enc.layers:
            for linear in (layer.self_attn.out_proj, layer.fc2):
                linear.weight[CHANNEL] = 0
                linear.bias[CHANNEL] = 0
        enc.layers[0].self_attn.out_proj.weight.zero_()
        cols = slice(HEAD * D_HEAD, (HEAD + 1) * D_HEAD)
        enc.layers[BLOCK].self_attn.out_proj.weight[CHANNEL, cols] = 40 * torch.randn(D_HEAD)
    return WhisperAdapter(model, "planted-head")


def probe_on_channel() -> ProbeLogitDiff:
    w = np.zeros((2, D), dtype=np.float32)
    w[1, CHANNEL], w[0, CHANNEL] = 1.0, -1.0
    return ProbeLogitDiff.from_readout(READOUT, w, np.zeros(2), ["sad", "happy"], "sad", "happy")


def pair(seed: int, n_samples: int = 25_600):
    """A tone (clean) and noise (corrupt) of 80 encoder frames (1.6 s of the tiny model's 2 s window)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_samples) / 16_000
    clean = (0.5 * np.sin(2 * np.pi * (200 + 100 * seed) * t)).astype(np.float32)
    corrupt = (0.05 * rng.standard_normal(n_samples)).astype(np.float32)
    return clean, corrupt


@pytest.fixture(scope="module")
def planted():
    adapter, metric = planted_whisper(), probe_on_channel()
    effects = []
    for p in range(2):
        clean_wave, corrupt_wave = pair(p)
        clean, corrupt = adapter.prepare([clean_wave]), adapter.prepare([corrupt_wave])
        n = max(clean.n_frames[0], corrupt.n_frames[0])
        windows = time_windows(n, 20, 20)
        df = pd.concat([patch_heads_pair(adapter, clean, corrupt, HEADS, windows, n, metric, max_batch=7),
                        attribute_heads_pair(adapter, clean, corrupt, HEADS, windows, n, metric)])
        effects.append(df.assign(pair_id=p))
    effects = pd.concat(effects, ignore_index=True)
    return adapter, effects, summarise_heads(effects)


def test_the_planted_contrast_is_material(planted):
    _, effects, _ = planted
    assert (effects["clean"] - effects["corrupt"]).abs().min() > 0.05  # well above MIN_METRIC_GAP


@pytest.mark.parametrize("method", ["exact", "attribution"])
def test_only_the_planted_head_lights_up_in_the_block_by_head_map(planted, method):
    _, _, summary = planted
    span = summary[(summary.scope == "span") & (summary.method == method)]
    assert len(span) == 2 * BLOCKS * N_HEADS and set(span.n_pairs) == {2}
    planted_cell = (span.site == f"encoder.blocks.{BLOCK}.attn_heads") & (span["head"] == HEAD)
    den, noi = span.direction == "denoising", span.direction == "noising"
    # denoising: the clean head alone restores the clean run; no other head moves the corrupt run
    assert span.loc[den & planted_cell, "mean"].item() == pytest.approx(1.0, abs=1e-4)
    assert span.loc[den & ~planted_cell, "mean"].abs().max() < 1e-4
    # noising: the corrupt head alone removes it all; every other head leaves the clean run as it is
    assert span.loc[noi & planted_cell, "mean"].item() == pytest.approx(0.0, abs=1e-4)
    assert (span.loc[noi & ~planted_cell, "mean"] - 1).abs().max() < 1e-4


def test_the_planted_heads_windows_add_up_to_its_whole_clip_effect_and_no_other_head_moves(planted):
    _, _, summary = planted
    win = summary[(summary.scope == "window") & (summary.method == "exact")]
    planted_cell = (win.site == f"encoder.blocks.{BLOCK}.attn_heads") & (win["head"] == HEAD)
    den = win.direction == "denoising"
    assert win.loc[den & ~planted_cell, "mean"].abs().max() < 1e-4
    # the probe pools the channel over frames and nothing downstream writes it: windows add up exactly
    assert win.loc[den & planted_cell, "mean"].sum() == pytest.approx(1.0, abs=1e-4)
    assert (win.loc[den & planted_cell, "mean"].abs() > 1e-3).sum() >= 3  # spread over the clip, not one window
    att = summary[(summary.scope == "window") & (summary.method == "attribution")]
    both = win.merge(att, on=["direction", "site", "head", "frame_start"], suffixes=("", "_attr"))
    np.testing.assert_allclose(both["mean"], both["mean_attr"], atol=1e-4)  # linear in the head: exact


def test_the_site_grid_agrees_attn_out_of_the_planted_block_carries_it_all():
    """The site-level patch of a site inside a block now resumes at the block's input: it must
    equal the patch hooked into a full forward (the planted block's attn_out restores 1, its MLP 0)."""
    adapter, metric = planted_whisper(), probe_on_channel()
    clean_wave, corrupt_wave = pair(0)
    clean, corrupt = adapter.prepare([clean_wave]), adapter.prepare([corrupt_wave])
    sites = [f"encoder.blocks.{BLOCK}.attn_out", f"encoder.blocks.{BLOCK}.mlp_hidden", "encoder.blocks.2.attn_heads"]
    windows = [(0, 80), (20, 40)]
    got = summarise(patch_pair(adapter, clean, corrupt, sites, windows, metric))
    den = got[(got.direction == "denoising")].set_index(["site", "frame_start"])["mean"]
    assert den[(f"encoder.blocks.{BLOCK}.attn_out", 0)] == pytest.approx(1.0, abs=1e-4)
    assert abs(den[(f"encoder.blocks.{BLOCK}.mlp_hidden", 0)]) < 1e-4
    # the same cells by hand: a full forward of the corrupt clip with the clean window hooked in
    _, clean_cache = adapter.run(clean, capture=sites)
    m_clean = float(metric(adapter.run(clean, capture=[READOUT])[1], clean)[0])
    m_corrupt = float(metric(adapter.run(corrupt, capture=[READOUT])[1], corrupt)[0])
    for site in sites:
        def put(h, s, donor=clean_cache[site]):
            h = h.clone()
            h[:, 20:40] = donor[:, 20:40]
            return h
        _, cache = adapter.run(corrupt, capture=[READOUT], interventions={site: put})
        want = (float(metric(cache, corrupt)[0]) - m_corrupt) / (m_clean - m_corrupt)
        assert den[(site, 20)] == pytest.approx(want, abs=1e-4)


def test_head_setter_writes_only_its_heads_columns_and_frames():
    act = torch.zeros(2, 6, 4 * 3)
    donor = torch.arange(6 * 12, dtype=torch.float32).reshape(6, 12)
    out = head_setter(donor, [(1, 0, 2), (3, 4, 9)], d_head=3)(act, "encoder.blocks.0.attn_heads")
    assert torch.equal(out[0, :2, 3:6], donor[:2, 3:6]) and out[0].count_nonzero() == 6
    assert torch.equal(out[1, 4:, 9:12], donor[4:, 9:12]) and out[1].count_nonzero() == 6  # cut at the end
    assert act.eq(0).all()
    cells = head_cells(2, [(0, 5), (5, 10)], 8)
    assert cells[:2] == [("span", (0, 0, 8)), ("span", (1, 0, 8))] and len(cells) == 2 + 2 * 2
    assert head_cells(2, [(0, 5)], 8, scopes=("span",)) == cells[:2]


def test_the_heatmaps_stage_draws_both_head_maps_and_the_ui_reads_them(planted, tmp_path):
    from affectlens.naming import parse_heatmap_stem
    from affectlens.stages.patch import heatmaps
    from affectlens.ui.index import index_results
    from affectlens.viz.heads import block_head_grid
    from affectlens.viz.heatmap import heatmap_grid

    adapter, effects, heads = planted
    folder = tmp_path / "results/patch/demo/tiny/sad-to-happy"
    folder.mkdir(parents=True)
    # a site summary as the patch rule writes it, and the head summary beside it
    site_effects = effects[(effects.scope == "span") & (effects["head"] == 0)].drop(columns=["scope", "head"])
    summarise(site_effects).assign(corruption="pairs", noise_sigma=np.nan).to_csv(folder / "summary.tsv", sep="\t",
                                                                               index=False)
    heads.assign(corruption="pairs", noise_sigma=np.nan).to_csv(folder / "heads_summary.tsv", sep="\t", index=False)
    out = tmp_path / "results/heatmaps"
    heatmaps({"smoke": [{"dataset": "demo", "model": "tiny", "contrast": "sad-to-happy",
                         "summary": str(folder / "summary.tsv")}]}, out)
    stems = sorted(p.stem for p in (out / "smoke").glob("*.png"))
    assert stems == ["demo__tiny__sad-to-happy", "demo__tiny__sad-to-happy__attribution",
                     "demo__tiny__sad-to-happy__head_windows", "demo__tiny__sad-to-happy__head_windows__attribution",
                     "demo__tiny__sad-to-happy__heads", "demo__tiny__sad-to-happy__heads__attribution"]
    assert [parse_heatmap_stem(s).kind for s in stems] == ["sites", "sites", "head_windows", "head_windows",
                                                           "heads", "heads"]
    page = (out / "index.html").read_text()
    assert "demo__tiny__sad-to-happy__heads.png" in page and "block × head" in page
    # the block × head map's numbers: one row per block, one column per head, the planted cell alone
    grid = heatmap_grid(block_head_grid(pd.read_csv(out / "smoke/demo__tiny__sad-to-happy__heads.tsv", sep="\t")),
                        "denoising")
    assert list(grid.index) == list(HEADS) and list(grid.columns) == [f"head {h}" for h in range(N_HEADS)]
    assert np.unravel_index(np.argmax(grid.to_numpy()), grid.shape) == (BLOCK, HEAD)
    maps = index_results(tmp_path / "results")["runs"]["demo/tiny"]["heatmaps"]
    assert [(h["map"], h["method"]) for h in maps] == [("sites", "exact"), ("sites", "attribution"),
                                                       ("head_windows", "exact"), ("head_windows", "attribution"),
                                                       ("heads", "exact"), ("heads", "attribution")]
