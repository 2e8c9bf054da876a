"""`patch.exact: top_k`: attribution patching screens the grid, exact patching runs on its top cells.
Known answer on the planted model; the stage with k >= every cell equals `exact: all`."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from affectlens.patching.attribution import attribute_pair, top_cell
from affectlens.patching.patch import patch_pair, summarise, time_windows, top_cells
from affectlens.settings import SettingsError
from planted import PlantedAdapter, planted_clip
from test_patching import SITES, planted_metric

PLANTED = ("encoder.blocks.2.resid_post", 10)  # the concept enters at block 2, frames [10, 20)


def test_top_cells_ranks_by_the_move_away_from_the_base_run():
    rows = pd.DataFrame({
        "direction": ["denoising"] * 3 + ["noising"] * 3,
        "site": ["a", "b", "c"] * 2, "depth": [0, 1, 2] * 2, "frame_start": [0, 0, 0] * 2,
        "raw": [0.1, -0.5, 0.3, 0.9, 1.0, 0.2], "clean": 1.0, "corrupt": 0.0,
    })
    # denoising moves away from corrupt (0): |-0.5| first; noising away from clean (1): 0.2 first
    assert top_cells(rows, 1) == {("denoising", "b", 0), ("noising", "c", 0)}
    assert top_cells(rows, 2) == {("denoising", "b", 0), ("denoising", "c", 0),
                                  ("noising", "c", 0), ("noising", "a", 0)}
    tied = rows.assign(raw=0.5)
    assert top_cells(tied, 1) == {("denoising", "a", 0), ("noising", "a", 0)}  # ties: the earliest site


def screened_planted(k, n_pairs=2):
    """Per planted pair: attribution on every cell, exact patching on its top k per direction."""
    adapter = PlantedAdapter(d=8, n_blocks=4, concept_block=2, span=(10, 20))
    windows = time_windows(40, 10, 10)
    metric = planted_metric(adapter)
    effects = []
    for p in range(n_pairs):
        clean = adapter.prepare([planted_clip(adapter, 40, +1.0, seed=2 * p)])
        corrupt = adapter.prepare([planted_clip(adapter, 40, -1.0, seed=2 * p + 1)])
        attr = attribute_pair(adapter, clean, corrupt, SITES, windows, metric)
        exact = patch_pair(adapter, clean, corrupt, SITES, windows, metric, max_batch=3, cells=top_cells(attr, k))
        effects.append(pd.concat([exact, attr]).assign(pair_id=p))
    return pd.concat(effects, ignore_index=True)


def test_top_k_exact_patching_recovers_the_planted_cell():
    effects = screened_planted(k=2)
    exact = effects[effects["method"] == "exact"]
    # The planted cell and the block after it (which carries it on) are the only cells that matter.
    for _, g in exact.groupby(["pair_id", "direction"]):
        assert set(zip(g["site"], g["frame_start"])) == {PLANTED, ("encoder.blocks.3.resid_post", 10)}
    assert (effects["method"] == "attribution").sum() == 2 * 2 * len(SITES) * 4  # attribution keeps the grid
    summary = summarise(effects, n_boot=20)
    ex = summary[summary["method"] == "exact"].set_index(["direction", "site", "frame_start"])["mean"]
    assert ex.loc[("denoising", *PLANTED)] == pytest.approx(1.0, abs=1e-5)  # restores the clean run
    assert ex.loc[("noising", *PLANTED)] == pytest.approx(0.0, abs=1e-5)  # removes it all
    for direction in ("denoising", "noising"):
        assert top_cell(summary[summary["method"] == "exact"], direction) == PLANTED


# --- the stage --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage_setup(tmp_path_factory):
    """The workflow's patch stage on a tiny real setup (bench/bench_scale.py: synthetic corpus,
    tiny wav2vec2 in a local folder, its store)."""
    from affectlens import stages

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_scale

    work = tmp_path_factory.mktemp("patch_top_k")
    model = bench_scale.make_model(work / "model")
    manifest = bench_scale.make_corpus(work / "corpus", n_speakers=2, n_sentences=2)
    cfg = bench_scale.workflow_config(model)
    stages.extract.extract(manifest, cfg["models"]["tiny"], work / "store.h5")
    return work, manifest, cfg


def run_stage(stage_setup, name, **patch):
    from affectlens import stages

    work, manifest, cfg = stage_setup
    out = work / name / "results/patch/synth/tiny/sad-to-happy"
    stages.patch.patch(work / "store.h5", manifest, cfg["models"]["tiny"], {"source": "sad", "target": "happy"},
                       {**cfg["patch"], **patch}, "label", out / "pairs.tsv", out / "effects.tsv",
                       out / "summary.tsv", out / "agreement.tsv")
    return out


def read(out, name):
    return pd.read_csv(out / name, sep="\t")


def test_top_k_over_every_cell_equals_the_full_exact_grid(stage_setup):
    full = read(run_stage(stage_setup, "all", exact="all"), "effects.tsv")
    n_cells = full[full["method"] == "exact"].groupby(["pair_id", "direction"]).size().max()
    screened = read(run_stage(stage_setup, "top_all", exact="top_k", top_k=int(n_cells) + 5), "effects.tsv")
    pd.testing.assert_frame_equal(screened, full)


def test_top_k_stage_writes_the_screened_cells_and_blank_heatmap_cells(stage_setup):
    from affectlens import stages
    from affectlens.viz.heatmap import heatmap_grid

    work = stage_setup[0]
    out = run_stage(stage_setup, "top_2", exact="top_k", top_k=2)
    effects, summary = read(out, "effects.tsv"), read(out, "summary.tsv")
    exact, attr = effects[effects["method"] == "exact"], effects[effects["method"] == "attribution"]
    assert (exact.groupby(["pair_id", "direction"]).size() == 2).all()
    assert (attr.groupby(["pair_id", "direction"]).size() > 2).all()
    for (pair, direction), g in exact.groupby(["pair_id", "direction"]):  # the attribution's top 2, exactly
        a = attr[(attr["pair_id"] == pair) & (attr["direction"] == direction)]
        assert set(zip(g["site"], g["frame_start"])) == {c[1:] for c in top_cells(a, 2)}
    grid = heatmap_grid(summary, "denoising", "exact")
    assert grid.shape == heatmap_grid(summary, "denoising", "attribution").shape  # the whole grid ...
    assert np.isnan(grid.to_numpy()).any() and np.isfinite(grid.to_numpy()).any()  # ... blank where not run
    heatmaps = work / "top_2" / "results/heatmaps"
    stages.patch.heatmaps({"s": [{"dataset": "synth", "model": "tiny", "contrast": "sad-to-happy",
                                  "summary": str(out / "summary.tsv")}]}, heatmaps)
    assert (heatmaps / "s" / "synth__tiny__sad-to-happy.png").stat().st_size > 0


def test_top_k_needs_attribution(stage_setup):
    with pytest.raises(SettingsError, match="patch.attribution: true"):
        run_stage(stage_setup, "no_attr", exact="top_k", attribution=False)
