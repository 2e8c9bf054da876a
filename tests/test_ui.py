"""`affectlens ui`: the index of a results folder, file serving confined to it, the CLI's defaults,
and the page in a real headless browser (Debian's chromium + chromedriver, driven by selenium) over
the results of the real Snakemake DAG on test_workflow's tiny config (conftest.tiny_workflow)."""

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from affectlens.ui.files import resolve_inside
from affectlens.ui.index import NO_STUDY, alpha_grid, index_results

CHROMIUM = os.environ.get("AFFECTLENS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("AFFECTLENS_CHROMEDRIVER", "/usr/bin/chromedriver")
TINY_PNG = bytes.fromhex(  # a valid 1 × 1 PNG
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f9c0000000049454e44ae426082")


def _touch(root: Path, rel: str, data: bytes = b"") -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


@pytest.fixture
def results(tmp_path) -> Path:
    """A hand-made results folder in the workflow's layout: one study with one run, a second run with
    only steering (no study), an uneven α grid, and files the index must ignore."""
    r = tmp_path / "results"
    for rel in ["probe/demo/tiny/sweep.tsv", "probe/demo/tiny/confusion.png", "probe/demo/tiny/layer_curve.png",
                "probe/demo/tiny/extra.png", "acoustic_features/demo.tsv", "probe_dynamic/demo/tiny/dynamic.png",
                "patch/demo/tiny/sad-to-happy/summary.tsv",
                "heatmaps/smoke/demo__tiny__sad-to-happy.png", "heatmaps/smoke/demo__tiny__sad-to-happy.tsv",
                "heatmaps/smoke/demo__tiny__sad-to-happy__attribution.png", "heatmaps/smoke/notes.png",
                "heatmaps/index.html",
                "sae/demo/tiny/encoder.blocks.0.resid_post/dashboard.html",
                "sae/demo/tiny/encoder.blocks.0.resid_post/metrics.json",
                "steer/demo/tiny/sad-to-happy/evaluation.tsv", "steer/demo/tiny/sad-to-happy/dose_response.png",
                "steer/demo/tiny/sad-to-happy/audio/readme.wav",
                "steer/other/base/calm-to-angry/audio/x__alpha1.wav",
                "extract/demo/tiny.h5"]:
        _touch(r, rel, TINY_PNG if rel.endswith(".png") else b"x")
    for clip in ["spk1_s01_sad", "spk2_s02_sad"]:
        for a in ["0", "0.5", "-1", "10", "2"]:
            _touch(r, f"steer/demo/tiny/sad-to-happy/audio/{clip}__alpha{a}.wav", b"RIFF")
        _touch(r, f"steer/demo/tiny/sad-to-happy/audio/{clip}__m-probe__alpha99.wav", b"RIFF")  # not the grid
    _touch(r, "decode/demo/audio/spk1_s01_sad.flac", b"fLaC")
    return r


def test_index_reads_studies_runs_figures_and_alpha_grid(results):
    idx = index_results(results)
    assert idx["studies"] == {"smoke": ["demo/tiny"], NO_STUDY: ["other/base"]}
    assert list(idx["runs"]) == ["demo/tiny", "other/base"]
    assert idx["heatmap_index"] == "heatmaps/index.html"
    run = idx["runs"]["demo/tiny"]
    assert run["probe"]["sweep"] == "probe/demo/tiny/sweep.tsv"
    # the layer curve first, known figures in their order, unknown ones after
    assert [f["name"] for f in run["probe"]["figures"]] == ["layer_curve", "confusion", "dynamic", "extra"]
    assert [(h["method"], h["png"], h["tsv"]) for h in run["heatmaps"]] == [
        ("exact", "heatmaps/smoke/demo__tiny__sad-to-happy.png", "heatmaps/smoke/demo__tiny__sad-to-happy.tsv"),
        ("attribution", "heatmaps/smoke/demo__tiny__sad-to-happy__attribution.png", None)]
    assert run["patch"] == {"sad-to-happy": "patch/demo/tiny/sad-to-happy/summary.tsv"}
    assert run["sae"] == [{"site": "encoder.blocks.0.resid_post",
                           "dashboard": "sae/demo/tiny/encoder.blocks.0.resid_post/dashboard.html",
                           "metrics": "sae/demo/tiny/encoder.blocks.0.resid_post/metrics.json"}]
    steer = run["steer"]["sad-to-happy"]
    assert steer["alphas"] == ["-1", "0", "0.5", "2", "10"]  # by value, spelled as in the file names
    assert set(steer["clips"]) == {"spk1_s01_sad", "spk2_s02_sad"}  # readme.wav is no steered clip
    assert steer["clips"]["spk2_s02_sad"]["0.5"] == "steer/demo/tiny/sad-to-happy/audio/spk2_s02_sad__alpha0.5.wav"
    assert steer["originals"] == {"spk1_s01_sad": "decode/demo/audio/spk1_s01_sad.flac", "spk2_s02_sad": None}
    assert steer["evaluation"] == "steer/demo/tiny/sad-to-happy/evaluation.tsv" and steer["summary"] is None
    assert idx["runs"]["other/base"]["probe"] is None
    assert idx["runs"]["other/base"]["steer"]["calm-to-angry"]["alphas"] == ["1"]
    # every path the index names is a file inside the folder
    for rel in _paths(idx):
        assert resolve_inside(results, rel) is not None, rel


def _paths(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k != "root":
                yield from _paths(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _paths(v)
    elif isinstance(obj, str) and "/" in obj and "." in obj.rsplit("/", 1)[-1]:
        yield obj


def test_index_of_a_missing_folder_fails_and_empty_grid_is_empty(tmp_path):
    with pytest.raises(FileNotFoundError):
        index_results(tmp_path / "nope")
    assert alpha_grid(tmp_path / "nope") == ([], {})


def test_only_files_inside_the_folder_are_resolved(results, tmp_path):
    secret = _touch(tmp_path, "secret.png", TINY_PNG)
    (results / "probe/demo/tiny/link_out.png").symlink_to(secret)
    (results / "probe/demo/tiny/link_in.png").symlink_to(results / "probe/demo/tiny/confusion.png")
    assert resolve_inside(results, "probe/demo/tiny/confusion.png") == (results / "probe/demo/tiny/confusion.png")
    assert resolve_inside(results, "probe/demo/tiny/link_in.png") is not None
    for bad in ["../secret.png", "probe/../../secret.png", str(secret), "/" + str(secret),
                "probe/demo/tiny/link_out.png",
                "probe\\..\\..\\secret.png", "probe//demo/tiny/confusion.png", "./probe/demo/tiny/confusion.png",
                "probe/demo/tiny", "extract/demo/tiny.h5", "probe/demo/tiny/missing.png", "", "a\x00b.png"]:
        assert resolve_inside(results, bad) is None, bad


def test_file_route_serves_inside_only(results, tmp_path):
    pytest.importorskip("dash", reason="the `ui` extra (Dash) is not installed")
    from affectlens.ui.app import create_app

    _touch(tmp_path, "secret.png", TINY_PNG)
    (results / "probe/demo/tiny/link_out.png").symlink_to(tmp_path / "secret.png")
    client = create_app(results).server.test_client()
    ok = client.get("/files/probe/demo/tiny/confusion.png")
    assert ok.status_code == 200 and ok.mimetype == "image/png" and ok.data == TINY_PNG
    assert ok.headers["X-Content-Type-Options"] == "nosniff"
    wav = client.get("/files/steer/demo/tiny/sad-to-happy/audio/spk1_s01_sad__alpha2.wav",
                     headers={"Range": "bytes=1-2"})
    assert wav.status_code == 206 and wav.data == b"IF" and wav.mimetype == "audio/wav"  # seekable audio
    for bad in ["/files/../secret.png", "/files/%2e%2e/secret.png", "/files/probe/%2e%2e/%2e%2e/secret.png",
                "/files/probe/demo/tiny/link_out.png", "/files/extract/demo/tiny.h5",
                "/files/" + str(tmp_path / "secret.png"),
                "/files/%2F" + str(tmp_path / "secret.png").lstrip("/"), "/files/probe/demo/tiny/", "/files",
                "/files/"]:
        r = client.get(bad)
        assert r.status_code == 404 and r.data != TINY_PNG, bad
    assert client.get("/anything").status_code == 200  # elsewhere Dash's own page answers
    assert client.post("/files/probe/demo/tiny/confusion.png").status_code in (404, 405)  # no uploads


def test_cli_ui_binds_to_localhost_by_default(results, monkeypatch):
    import affectlens.ui.app as app_module
    from affectlens.cli import main

    calls = []
    monkeypatch.setattr(app_module, "serve", lambda root, host, port: calls.append((root, host, port)))
    assert main(["ui", str(results)]) == 0
    assert main(["ui", str(results), "--host", "0.0.0.0", "--port", "9001"]) == 0
    assert calls == [(str(results), "127.0.0.1", 8050), (str(results), "0.0.0.0", 9001)]


def test_cli_ui_on_a_missing_folder_is_an_error(tmp_path, capsys):
    pytest.importorskip("dash", reason="the `ui` extra (Dash) is not installed")
    from affectlens.cli import main

    assert main(["ui", str(tmp_path / "nope")]) == 2
    assert "no results folder" in capsys.readouterr().err


# --- the real page, in a real browser, over the real workflow's results ---------------------------------
def _browser():
    """A headless Debian chromium, or a skip that says what is missing."""
    pytest.importorskip("dash", reason="the `ui` extra (Dash) is not installed")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the `test` extra)")
    from selenium.webdriver.chrome.service import Service

    chromium = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    driver = CHROMEDRIVER if Path(CHROMEDRIVER).exists() else shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip(f"no headless browser: needs chromium ({CHROMIUM}) and chromedriver ({CHROMEDRIVER}); "
                    "on Debian: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--mute-audio",
                "--window-size=1280,3600"]:
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_without_a_browser_the_browser_test_skips_and_says_why(monkeypatch):
    pytest.importorskip("dash", reason="the `ui` extra (Dash) is not installed")
    pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the `test` extra)")
    monkeypatch.setattr(f"{__name__}.CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setattr(f"{__name__}.CHROMEDRIVER", "/nonexistent/chromedriver")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match="needs chromium .*apt-get install chromium chromium-driver"):
        _browser()


@pytest.fixture
def page(request):
    """(browser at the UI's page, results folder, the server's base URL), the app served in a thread.
    The browser is looked for first, so that without one the test skips before running the DAG."""
    from werkzeug.serving import make_server

    from affectlens.ui.app import create_app

    browser = _browser()
    try:
        results = request.getfixturevalue("tiny_workflow")[0] / "results"
    except BaseException:
        browser.quit()
        raise
    server = make_server("127.0.0.1", 0, create_app(results).server, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        browser.set_page_load_timeout(30)
        browser.get(base + "/")
        yield browser, results, base
    finally:
        browser.quit()
        server.shutdown()


def _wait(browser, condition, what: str, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.2).until(lambda b: condition(b), message=what)


@pytest.mark.workflow
@pytest.mark.slow
def test_page_in_a_headless_browser(page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from test_workflow import TINY

    browser, results, base = page
    t0 = time.time()
    steer = results / "steer/demo/tiny/sad-to-happy"
    expected_alphas = [f"{a:g}" for a in sorted(TINY["steer"]["alphas"])]
    assert expected_alphas == ["0", "2"]
    clip = min(steer.glob("audio/*__alpha0.wav")).name.split("__")[0]  # the page opens on the first clip

    # the heatmaps of the study render (decoded images, not broken links)
    heatmaps = _wait(browser, lambda b: b.execute_script(
        "const i = [...document.querySelectorAll('img.heatmap')];"
        "return i.length && i.every(x => x.complete && x.naturalWidth > 0)"
        "  ? i.map(x => [x.src, x.naturalWidth]) : null"),
        "heatmap images to load")
    shown = {src.rsplit("/", 1)[-1] for src, _ in heatmaps}
    assert shown == {p.name for p in (results / "heatmaps/smoke").glob("*.png")}
    assert shown >= {"demo__tiny__sad-to-happy.png", "demo__tiny__sad-to-happy__heads.png"}  # head-level maps too
    assert all(w > 100 for _, w in heatmaps)
    probes = _wait(browser, lambda b: b.execute_script(
        "const i = [...document.querySelectorAll('img.probe')];"
        "return i.length && i.every(x => x.complete && x.naturalWidth > 0) ? i.map(x => x.src) : null"),
        "probe figures to load")
    assert probes[0].endswith("/files/probe/demo/tiny/layer_curve.png")

    # original vs steered audio, the α control over the pre-rendered grid
    steered = browser.find_element(By.ID, "audio-steered")
    original = browser.find_element(By.ID, "audio-original")
    src0 = _wait(browser, lambda b: steered.get_attribute("src"), "the steered audio's src")
    assert clip in browser.find_element(By.ID, "clip").text
    assert src0 == f"{base}/files/steer/demo/tiny/sad-to-happy/audio/{clip}__alpha0.wav"
    assert original.get_attribute("src") == f"{base}/files/decode/demo/audio/{clip}.flac"
    marks = [m.text for m in browser.find_elements(By.CSS_SELECTOR, "#alpha .dash-slider-mark")]
    assert marks == expected_alphas
    # the browser decodes both files: durations are the files' own
    durations = _wait(browser, lambda b: b.execute_script(
        "const a = [document.getElementById('audio-original'), document.getElementById('audio-steered')];"
        "return a.every(x => x.readyState >= 1 && x.duration > 0) ? a.map(x => x.duration) : null"),
        "audio metadata to load")
    wav = steer / "audio" / f"{clip}__alpha0.wav"
    assert durations[1] == pytest.approx(sf.info(wav).duration, abs=0.05)
    assert durations[0] == pytest.approx(sf.info(results / f"decode/demo/audio/{clip}.flac").duration, abs=0.05)

    thumb = browser.find_element(By.CSS_SELECTOR, "#alpha [role=slider]")
    thumb.send_keys(Keys.ARROW_RIGHT)
    src2 = _wait(browser, lambda b: (s := steered.get_attribute("src")) != src0 and s, "α = 2 to change the audio src")
    assert src2 == f"{base}/files/steer/demo/tiny/sad-to-happy/audio/{clip}__alpha2.wav"
    assert browser.find_element(By.ID, "alpha-label").text == "2"
    _wait(browser, lambda b: b.execute_script("return document.getElementById('audio-steered').readyState >= 1"),
          "the α = 2 audio to load")

    # the evaluation numbers are this clip's rows of evaluation.tsv (the difference of means, whose audio
    # the slider plays); the row of the current α is marked
    ev = pd.read_csv(steer / "evaluation.tsv", sep="\t", dtype={"output": str})
    ev = ev[(ev.clip_id == clip) & ev.method.isin(["none", "diff_of_means"])].set_index("output")  # the slider's method
    table = browser.find_element(By.ID, "evaluation-table")
    header = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    rows = {r.find_elements(By.TAG_NAME, "td")[0].text: r for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")}
    assert set(rows) == {"original", *expected_alphas}
    assert "current" in rows["2"].get_attribute("class") and "current" not in (rows["0"].get_attribute("class") or "")
    for output, row in rows.items():
        cells = dict(zip(header, (td.text for td in row.find_elements(By.TAG_NAME, "td"))))
        for col in ["p_target_model_probe", "p_target_acoustic", "active_rms_db"]:
            assert float(cells[col]) == pytest.approx(ev.loc[output, col], rel=1e-2, abs=1e-4), (output, col)
    summary = browser.find_element(By.ID, "summary-table").text
    assert "p_target_acoustic" in summary and "original" in summary

    # a study / run picker is there, and the SAE dashboard link is served
    assert "smoke" in browser.find_element(By.ID, "study").text
    dash_link = browser.find_element(By.CSS_SELECTOR, "#sae a").get_attribute("href")
    assert dash_link == f"{base}/files/sae/demo/tiny/encoder.blocks.0.resid_post/dashboard.html"

    shot = tmp_path / "ui_screenshot.png"
    assert browser.save_screenshot(str(shot))
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    width, height = np.frombuffer(png[16:24], dtype=">u4")
    assert width >= 1000 and height >= 1000
    print(f"\nUI screenshot: {shot}")
    assert time.time() - t0 < 60
