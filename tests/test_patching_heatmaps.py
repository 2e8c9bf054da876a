"""Heatmaps of a planted patch summary: exact and attribution maps, TSVs and the index page."""

import pandas as pd

from affectlens import stages
from affectlens.patching.attribution import agreement
from affectlens.viz.heatmap import heatmap_grid, methods_of
from test_patching_attribution import both_methods
from test_patching import planted_metric


def test_heatmaps_exact_and_attribution_side_by_side(tmp_path):
    effects, summary = both_methods(planted_metric)
    folder = tmp_path / "results/patch/demo/planted/sad-to-happy"
    folder.mkdir(parents=True)
    summary.assign(corruption="pairs").to_csv(folder / "summary.tsv", sep="\t", index=False)
    agreement(summary, effects).to_csv(folder / "agreement.tsv", sep="\t", index=False)

    grid = heatmap_grid(summary, "denoising", "attribution")
    assert grid.shape == (5, 4)  # embed + 4 blocks × 4 windows
    assert list(grid.columns)[1] == "0.20–0.40s"  # planted frame rate 50/s: frames 10..20
    assert abs(grid.loc["encoder.blocks.2.resid_post", "0.20–0.40s"] - 1.0) < 1e-5
    assert methods_of(summary) == ["exact", "attribution"]

    out = tmp_path / "results/heatmaps"
    stages.patch.heatmaps({"smoke": [{"dataset": "demo", "model": "planted", "contrast": "sad-to-happy",
                                      "summary": str(folder / "summary.tsv")}]}, out)
    for stem in ("demo__planted__sad-to-happy", "demo__planted__sad-to-happy__attribution"):
        assert (out / "smoke" / f"{stem}.png").stat().st_size > 0
        tsv = pd.read_csv(out / "smoke" / f"{stem}.tsv", sep="\t")
        assert tsv["method"].nunique() == 1  # one TSV per map, its own numbers only
        assert not tsv.duplicated(["direction", "site", "frame_start"]).any()
    page = (out / "index.html").read_text()
    assert "demo__planted__sad-to-happy.png" in page and "demo__planted__sad-to-happy__attribution.png" in page
    assert "Spearman 1.00" in page and "top cell agrees" in page
