"""`snakemake --report` after the tiny workflow run (test_workflow.py's config): the report holds
the heatmaps, layer curves, SAE dashboards, steering plots and playable steered audio, each with
its caption, in categories by stage and subcategories by study, and the benchmark summary."""

import base64
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from test_workflow import REPO, snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.slow]


@pytest.fixture(scope="module")
def work(tiny_workflow):
    """The session's one run of the tiny DAG (tests/conftest.py)."""
    return tiny_workflow[0]


def report_results(html: str) -> dict:
    """The report's table of results: {path: {name, caption, mime_type, labels, data_uri, ...}}."""
    m = re.search(r"var results = (\{.*?\});\s*\n", html, re.S)
    assert m, "no results table in the report"
    return json.loads(m.group(1))


def report_categories(html: str) -> dict:
    m = re.search(r"var categories = (\{.*?\});\s*\n", html, re.S)
    assert m, "no categories in the report"
    return json.loads(m.group(1))


def decoded(uri: str) -> bytes:
    return base64.b64decode(uri.split("base64,", 1)[1])


@pytest.fixture(scope="module")
def html_report(work):
    out = snakemake(work, "--report", "report.html")
    assert out.returncode == 0, out.stderr[-4000:]
    return (work / "report.html").read_text()


def test_report_has_every_figure_with_its_caption(work, html_report):
    results = report_results(html_report)
    by_path = {Path(p).as_posix(): r for p, r in results.items()}
    heatmap = "results/heatmaps/smoke/demo__tiny__sad-to-happy.png"
    expected = {
        heatmap: "Activation patching heatmap of study",
        "results/probe/demo/tiny/layer_curve.png": "Probe scores per site",
        "results/sae/demo/tiny/encoder.blocks.0.resid_post/dashboard.html": "Feature dashboard of the sparse autoencoder",
        "results/steer/demo/tiny/sad-to-happy/dose_response.png": "Steering dose response",
        "results/steer_listen/demo/tiny/sad-to-happy.html": "Listening page of one steering run",
        "results/benchmarks/summary.tsv": "Resources of the heavy jobs",
    }
    for path, caption in expected.items():
        assert path in by_path, (path, sorted(by_path))
        assert caption in by_path[path]["caption"], (path, by_path[path]["caption"][:300])
    # captions are rendered with the file's own wildcards (the study from the heatmap pattern, the site)
    assert "study <strong>smoke</strong>" in by_path[heatmap]["caption"]
    sae = by_path["results/sae/demo/tiny/encoder.blocks.0.resid_post/dashboard.html"]
    assert "encoder.blocks.0.resid_post" in sae["caption"]
    assert sae["labels"]["site"] == "encoder.blocks.0.resid_post"
    # the heatmap and the layer curve are the real PNGs, embedded
    for path in (heatmap, "results/probe/demo/tiny/layer_curve.png"):
        png = decoded(by_path[path]["data_uri"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == (work / path).read_bytes()


def test_report_categories_by_stage_and_study(html_report):
    cats = report_categories(html_report)
    assert {"Patching heatmaps", "Probes", "Sparse autoencoders", "Steering", "Benchmarks"} <= set(cats)
    for stage in ("Patching heatmaps", "Probes", "Sparse autoencoders", "Steering"):
        assert set(cats[stage]) == {"smoke"}, (stage, cats[stage])  # the tiny config's one study


def test_steered_audio_is_playable_in_the_report(work, html_report):
    results = {Path(p).as_posix(): r for p, r in report_results(html_report).items()}
    page = decoded(results["results/steer_listen/demo/tiny/sad-to-happy.html"]["data_uri"]).decode()
    players = re.findall(r'<audio controls preload="none" src="data:(audio/[a-z]+);base64,([A-Za-z0-9+/=]+)"', page)
    ev = pd.read_csv(work / "results/steer/demo/tiny/sad-to-happy/evaluation.tsv", sep="\t")
    # per clip: the original, alpha 0 once (one file shared by every method and control), and each
    # method and control (random: each seed) at alpha 2 -- one player per file written, plus the original
    files = ev[ev.output != "original"].drop_duplicates(["clip_id", "file"])
    assert len(players) == 2 + len(files) == 2 + len(list((work / "results/steer/demo/tiny/sad-to-happy/audio").glob("*.wav")))
    wavs = {base64.b64decode(b) for mime, b in players if mime == "audio/wav"}
    on_disk = {p.read_bytes() for p in (work / "results/steer/demo/tiny/sad-to-happy/audio").glob("*.wav")}
    assert wavs == on_disk  # every steered WAV, byte for byte
    assert sum(mime == "audio/flac" for mime, _ in players) == 2  # the originals (decoded FLAC)
    assert "α = 2" in page and "P(target), acoustic judge" in page


def test_benchmarks_are_summarised(work, html_report):
    table = pd.read_csv(work / "results/benchmarks/summary.tsv", sep="\t")
    assert set(table.rule) == {"extract", "sae", "patch", "steer"}
    assert (table.wall_s > 0).all() and (table.max_rss_mb > 0).all()
    raw = pd.read_csv(work / "benchmarks/extract/demo/tiny.tsv", sep="\t")
    assert table.loc[table.rule == "extract", "wall_s"].iloc[0] == pytest.approx(raw["s"].iloc[0])
    assert "Statistics" in html_report  # Snakemake's own runtime panel


def test_zip_report_holds_the_files(work):
    out = snakemake(work, "--report", "report.zip")
    assert out.returncode == 0, out.stderr[-4000:]
    with zipfile.ZipFile(work / "report.zip") as z:
        names = z.namelist()
        assert "report/report.html" in names
        heat = [n for n in names if n.endswith("demo__tiny__sad-to-happy.png")]
        assert len(heat) == 1
        assert z.read(heat[0]) == (work / "results/heatmaps/smoke/demo__tiny__sad-to-happy.png").read_bytes()
        listen = [n for n in names if n.endswith("sad-to-happy.html") and "/data/raw/" in n]
        assert len(listen) == 1 and b"<audio controls" in z.read(listen[0])


def test_report_needs_nothing_beyond_the_package_dependencies():
    """The report's renderer imports docutils, jinja2, humanfriendly (snakemake's own
    dependencies) and pygments, which snakemake does not declare: pyproject does."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.match(r"pygments\b", d, re.I) for d in deps)
    code = ("import snakemake.report, snakemake.report.html_reporter, docutils, pygments, jinja2, humanfriendly;"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
