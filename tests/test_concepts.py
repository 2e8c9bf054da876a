"""Concepts from folders (issue 21.3): the statistics of the concept finder (group bootstrap, the
grouped permutation null, Benjamini-Hochberg q), known answers through a planted model and planted
SAEs (the planted concept feature ranks first and is significant; a random SAE, and a split with no
concept, find nothing significant), the stage, `affectlens concept` with its argument checks, the
config section, the UI listing, and the real workflow rule on a tiny config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import yaml
from scipy.stats import false_discovery_control

import affectlens.models
from affectlens.cli import main
from affectlens.config import ConfigError, check_config, concept_sae
from affectlens.data.concepts import concept_clips
from affectlens.sae import build, save_sae
from affectlens.sae.concept import (concept_permutations, feature_statistics, find_concept, group_bootstrap_auroc,
                                    permutation_p_values, permutations_needed, probe_ks)
from affectlens.sae.features import auroc
from affectlens.settings import ConceptConfig
from planted import PlantedAdapter

REPO = Path(__file__).resolve().parents[1]
SR = 16000
PLANTED_SITE = "encoder.blocks.2.resid_post"  # the planted block writes the concept into channel 1
CONCEPT_FEATURE = 5

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the statistics -----------------------------------------------------------------------------

def test_the_group_bootstrap_equals_resampling_whole_groups():
    """The one-pass interval is the percentile interval of `auroc` on clips of groups drawn with
    replacement (the same draws), ties and all."""
    rng = np.random.default_rng(0)
    X = np.maximum(rng.normal(size=(70, 6)), 0)
    X[:, 3] = np.round(X[:, 3])  # many ties
    positive = rng.random(70) < 0.4
    groups = rng.integers(0, 9, 70).astype(str)
    low, high = group_bootstrap_auroc(X, positive, groups, n_boot=300, seed=3)
    names = np.unique(groups)
    draws = []
    for d in np.random.default_rng(3).integers(0, len(names), (300, len(names))):
        rows = np.concatenate([np.flatnonzero(groups == names[k]) for k in d])
        draws.append(auroc(X[rows], positive[rows]) if 0 < positive[rows].sum() < len(rows) else np.full(6, np.nan))
    ref_low, ref_high = np.nanpercentile(np.array(draws), [2.5, 97.5], axis=0)
    np.testing.assert_allclose(low, ref_low, atol=1e-12)
    np.testing.assert_allclose(high, ref_high, atol=1e-12)
    assert (low <= auroc(X, positive)).all() and (auroc(X, positive) <= high).all()


def test_the_null_keeps_each_speakers_mix_and_moves_one_sided_groups_whole():
    rng = np.random.default_rng(0)
    positive = np.array([1, 1, 0, 0, 0, 1, 0, 1, 1, 1, 0, 0], bool)
    groups = np.array(["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"] * 2)  # a, b crossed; c (with), d (without)
    P, how = concept_permutations(positive, groups, 400, rng)
    for g in ("a", "b"):
        assert (P[:, groups == g].sum(1) == positive[groups == g].sum()).all()  # the speaker's mix is kept
    c, d = P[:, groups == "c"], P[:, groups == "d"]
    assert (c.all(1) | ~c.any(1)).all() and (d.all(1) | ~d.any(1)).all()  # whole groups move
    assert (c[:, 0] != d[:, 0]).all() and c[:, 0].mean() == pytest.approx(0.5, abs=0.1)
    assert "within each of the 2 groups" in how and "2 one-sided groups" in how
    P, how = concept_permutations(positive, np.arange(12).astype(str), 400, rng)
    assert (P.sum(1) == positive.sum()).all() and "among the 12 clips" in how


def test_p_values_have_their_resolution_and_bh_is_scipys():
    rng = np.random.default_rng(1)
    X = np.maximum(rng.normal(size=(40, 30)), 0)
    positive = np.arange(40) % 2 == 0
    X[positive, 0] += 5.0  # separates perfectly
    p, resolution, _ = permutation_p_values(X, positive, np.arange(40).astype(str), 499, seed=0)
    assert resolution == 1 / 500 and p.min() >= resolution and p[0] == resolution
    table, summary = feature_statistics(X, positive, n_permutations=499)
    t = table.set_index("feature")
    np.testing.assert_allclose(t.loc[np.arange(30), "q_value"], false_discovery_control(p, method="bh"))
    assert (t["q_value"] >= t["p_value"]).all() and t.loc[0, "rank"] == 0
    # 499 permutations cannot make a lone feature among 30 significant: q >= 30 / 500 > 0.05
    assert summary["lone_feature_q_floor"] == pytest.approx(30 / 500) and t.loc[0, "q_value"] == pytest.approx(0.06)
    assert not t.loc[0, "significant"] and summary["p_resolution"] == 1 / 500
    table, summary = feature_statistics(X, positive)  # enough permutations for it (at least 999)
    assert summary["n_permutations"] == 999 and table.iloc[0]["feature"] == 0 and table.iloc[0]["significant"]
    assert permutations_needed(3072, 0.05) == 61439 and permutations_needed(10, 0.05) == 999


def test_a_speaker_confound_cannot_look_like_the_concept():
    """With and without recorded by different speakers: a feature that only tells the speakers apart
    separates the folders perfectly, yet whole speakers are the unit, so its p cannot go below
    1 / C(6, 3) and it is not significant; counted as clips (no groups) it would be."""
    rng = np.random.default_rng(2)
    speakers = np.repeat(np.arange(6), 8)
    positive = speakers < 3
    X = np.maximum(rng.normal(size=(48, 4)), 0)
    X[:, 0] = np.where(positive, 10.0, 0.0) + speakers + 0.1 * rng.random(48)  # a speaker feature
    grouped, summary = feature_statistics(X, positive, speakers.astype(str), n_permutations=999)
    assert grouped.iloc[0]["feature"] == 0 and grouped.iloc[0]["auroc"] == 1.0
    assert grouped.iloc[0]["p_value"] >= 1 / 20 - 0.02 and not grouped["significant"].any()
    assert "one-sided groups (whole groups move)" in summary["null"]
    as_clips, _ = feature_statistics(X, positive, None, n_permutations=999)
    assert as_clips.iloc[0]["p_value"] == 1 / 1000 and as_clips.iloc[0]["significant"]


def test_features_that_never_fire_are_not_tested():
    X = np.zeros((20, 3))
    X[:, 1] = np.arange(20) % 3
    table, summary = feature_statistics(X, np.arange(20) < 10, n_permutations=99)
    t = table.set_index("feature")
    assert not t.loc[0, "tested"] and np.isnan(t.loc[0, "p_value"]) and not t.loc[0, "significant"]
    assert t.loc[1, "tested"] and summary["n_tested"] == 1 and t.loc[1, "p_value"] > 0.05


def test_probe_feature_counts():
    assert probe_ks(10) == (1, 2, 4, 8, 10) and probe_ks(8) == (1, 2, 4, 8) and probe_ks(1) == (1,)


# -- known answers through a planted model ------------------------------------------------------

def planted_clips(concept: bool, n_speakers: int = 6, per_side: int = 5, seed: int = 0):
    """(with ids, without ids, with groups, without groups, {id: [frame, d + 1] input}): each speaker
    records `per_side` clips of each side; a "with" clip carries the planted concept at strength
    U(0.5, 1.5) when `concept`, else none (both sides then come from one distribution)."""
    rng = np.random.default_rng(seed)
    inputs, ids, groups = {}, {"with": [], "without": []}, {"with": [], "without": []}
    for s in range(n_speakers):
        voice = rng.normal(scale=0.5, size=8)
        for side in ("with", "without"):
            for i in range(per_side):
                n = int(rng.integers(30, 50))
                x = rng.normal(size=(n, 8)) + voice
                x[:, 1] = 0
                strength = rng.uniform(0.5, 1.5) if concept and side == "with" else 0.0
                clip = f"spk{s}-{side}-{i}"
                inputs[clip] = np.concatenate([x, np.full((n, 1), strength)], axis=1).astype(np.float32)
                ids[side].append(clip)
                groups[side].append(f"spk{s}")
    return ids["with"], ids["without"], groups["with"], groups["without"], inputs


def planted_sae(reads_concept: bool, seed: int = 0):
    """A ReLU SAE over the 8 channels, 16 random features that never read channel 1 (the concept's);
    with `reads_concept`, feature CONCEPT_FEATURE reads channel 1 alone."""
    g = torch.Generator().manual_seed(seed)
    sae = build("relu", d_in=8, d_sae=16, center_input=False, normalize_input=False, b_dec_init="zeros")
    W = torch.randn(16, 8, generator=g)
    W[:, 1] = 0
    if reads_concept:
        W[CONCEPT_FEATURE] = 0
        W[CONCEPT_FEATURE, 1] = 1.0
    W = W / W.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_enc.copy_(W)
        sae.W_dec.copy_(W)
        sae.b_enc.zero_()
    return sae.eval()


class ExtractablePlanted(PlantedAdapter):
    """The planted model with one (unused) parameter: extraction records the model's dtype and device."""

    def __init__(self):
        super().__init__(d=8, n_blocks=4, concept_block=2, span=(10, 20))
        self.model.register_parameter("unused", torch.nn.Parameter(torch.zeros(())))


def run_planted(concept: bool, sae, **kw):
    w, wo, gw, gwo, inputs = planted_clips(concept)
    return find_concept(sae, ExtractablePlanted(), PLANTED_SITE, w, wo,
                        gw, gwo, load_wave=inputs.__getitem__, storage_dtype="float32", n_boot=300, top_k=4,
                        top_clips=3, n_splits=3, **kw)


def test_the_planted_concept_feature_ranks_first_and_is_significant():
    c = run_planted(True, planted_sae(True))
    best = c.features.iloc[0]
    assert best["feature"] == CONCEPT_FEATURE and best["auroc"] == 1.0 and best["auroc_low"] == 1.0
    assert best["p_value"] == c.summary["p_resolution"] == 1 / 1000 and best["q_value"] <= 0.05
    assert best["significant"] and c.features["significant"].sum() == 1  # the others are blind to it
    assert "within each of the 6 groups" in c.summary["null"] and c.summary["n_permutations"] == 999
    probe = c.probe.set_index("k")
    assert list(probe.index) == [1, 2, 4] and probe.loc[1, "features"] == str(CONCEPT_FEATURE)
    assert probe.loc[1, "auroc"] == 1.0 and probe.loc[1, "accuracy"] == 1.0 and probe.loc[1, "n_folds"] == 3
    top = c.top_clips[c.top_clips["feature"] == CONCEPT_FEATURE]
    assert len(top) == 3 and set(top["concept"]) == {"with"} and (top["feature_rank"] == 0).all()
    assert top["peak_frame"].between(10, 19).all()  # the planted span
    assert c.acts.shape == (60, 16) and list(c.clips["concept"]).count("with") == 30


def test_a_random_sae_finds_nothing_significant():
    """Random features that do not read the concept's channel, on the clips that carry it."""
    c = run_planted(True, planted_sae(False, seed=1))
    assert not c.features["significant"].any() and c.summary["n_significant"] == 0
    assert c.features["q_value"].min() > 0.05 and c.features["tested"].sum() >= 8


def test_no_concept_no_finding():
    """The planted SAE, and a fully random one, on two folders drawn from one distribution."""
    for sae in (planted_sae(True), build("relu", d_in=8, d_sae=16, center_input=False, normalize_input=False,
                                         b_dec_init="zeros").eval()):
        c = run_planted(False, sae, seed=4)
        assert not c.features["significant"].any(), c.features.head()


# -- the stage and the CLI on a tiny random Whisper ---------------------------------------------

def tone(path: Path, f: float, seed: int, seconds: float = 1.0) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.3 * np.sin(2 * np.pi * f * t) + 0.02 * rng.standard_normal(len(t))).astype(np.float32), SR)


def tone_folders(root: Path, speakers: int = 3, per_side: int = 3) -> tuple[Path, Path]:
    """high/spkN/*.wav (tones near 350 Hz) and low/spkN/*.wav (near 200 Hz), each speaker in both."""
    for s in range(speakers):
        for i in range(per_side):
            tone(root / "high" / f"spk{s}" / f"t{i}.wav", 350 + 10 * s + 3 * i, seed=100 * s + i)
            tone(root / "low" / f"spk{s}" / f"t{i}.wav", 200 + 10 * s + 3 * i, seed=100 * s + i + 50)
    return root / "high", root / "low"


@pytest.fixture(scope="module")
def tiny_adapter():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from affectlens.models.whisper import WhisperAdapter

    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=96, d_model=32, max_source_positions=100, encoder_layers=2, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, pad_token_id=0, bos_token_id=1, eos_token_id=0,
                           decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])
    return WhisperAdapter(WhisperForConditionalGeneration(config).eval(), "tiny-random")


class ModelLoaded(Exception):
    """Raised instead of loading a model: reaching it means every argument passed the checks."""


@pytest.fixture
def tiny(tiny_adapter, monkeypatch):
    """`--model tiny-random` loads the tiny random Whisper; any other source refuses to load."""
    def load(family, source, **kw):
        if source == "tiny-random":
            return tiny_adapter
        raise ModelLoaded(source)

    monkeypatch.setattr(affectlens.models, "load_adapter", load)
    return tiny_adapter


@pytest.fixture(scope="module")
def concept_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("concept")
    high, low = tone_folders(root)
    sae = build("topk", d_in=32, expansion=2, k=8)
    sae.init_from_data(torch.randn(512, 32))
    sae_dir = root / "sae" / "encoder.blocks.0.resid_post"
    save_sae(sae, sae_dir)
    return root, high, low, sae_dir


def test_concept_clips_group_by_subfolder_or_file(concept_inputs, tmp_path):
    _, high, _, _ = concept_inputs
    files, groups = concept_clips(high)
    assert len(files) == 9 and groups[:3] == ["spk0"] * 3 and sorted(set(groups)) == ["spk0", "spk1", "spk2"]
    tone(high / "loose.wav", 300, seed=0)  # directly in the folder: its own group
    try:
        files, groups = concept_clips(high)
        assert groups[files.index(high / "loose.wav")] == f"file:{high / 'loose.wav'}"
        assert len(set(concept_clips(high, "file")[1])) == 10
    finally:
        (high / "loose.wav").unlink()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"concepts\.x\.with_concept: .* holds no audio files"):
        concept_clips(tmp_path / "empty", key="concepts.x.with_concept")
    with pytest.raises(ValueError, match="group_by 'speaker'"):
        concept_clips(high, "speaker")


def test_cli_concept_writes_every_file(tiny, concept_inputs, tmp_path, capsys):
    _, high, low, sae_dir = concept_inputs
    out = tmp_path / "high-vs-low"
    code = main(["concept", "--with", str(high), "--without", str(low), "--sae", str(sae_dir), "--model", "tiny-random",
                 "--out", str(out), "--n-boot", "200", "--top-k", "4", "--top-clips", "2", "--n-splits", "3"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "concept high-vs-low: 9 clips with, 9 without, 3 groups" in printed.out
    assert "Benjamini-Hochberg" in printed.out and "probe on the top 4" in printed.out
    assert {p.name for p in out.iterdir()} == {"features.tsv", "probe.tsv", "top_clips.tsv", "clips.tsv",
                                               "features.png", "dashboard.html", "summary.json"}
    feats = pd.read_csv(out / "features.tsv", sep="\t")
    assert len(feats) == 64 and list(feats["rank"]) == list(range(64)) and feats["feature"].nunique() == 64
    assert (feats["effect_size"].diff().dropna() <= 1e-12).all()  # best first
    tested = feats[feats["tested"]]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_permutations"] == permutations_needed(len(tested), 0.05)
    assert (tested["p_value"] >= summary["p_resolution"]).all() and (tested["q_value"] >= tested["p_value"]).all()
    assert (tested["auroc_low"] <= tested["auroc"] + 1e-12).all() and (tested["auroc"] <= tested["auroc_high"] + 1e-12).all()
    # 350 vs 200 Hz tones: even a random Whisper and SAE tell them apart, and the test says so
    assert feats.iloc[0]["auroc"] >= 0.9 and feats.iloc[0]["significant"] and summary["n_significant"] >= 1
    assert summary["site"] == "encoder.blocks.0.resid_post" and summary["model"] == "tiny-random"
    assert summary["n_groups"] == 3 and "within each of the 3 groups" in summary["null"]
    probe = pd.read_csv(out / "probe.tsv", sep="\t")
    assert list(probe["k"]) == [1, 2, 4] and probe["auroc"].between(0, 1).all() and (probe["n_folds"] == 3).all()
    top = pd.read_csv(out / "top_clips.tsv", sep="\t")
    assert set(top["feature"]) <= set(feats["feature"].head(4)) and (top.groupby("feature").size() <= 2).all()
    assert top["path"].map(lambda p: Path(p).is_file()).all() and set(top["concept"]) <= {"with", "without"}
    clips = pd.read_csv(out / "clips.tsv", sep="\t")
    assert len(clips) == 18 and set(clips["group"]) == {"spk0", "spk1", "spk2"}
    assert clips["clip_id"].str.startswith(("with/spk", "without/spk")).all()
    page = (out / "dashboard.html").read_text()
    assert 1 <= page.count("class='card'") <= 4 and "q_value" in page and "<audio" in page
    assert (out / "features.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("change, message", [
    (dict(with_concept="missing"), r"--with: folder .*missing does not exist"),
    (dict(without_concept="empty"), r"--without: .*empty holds no audio files"),
    (dict(without_concept="high"), "same folder"),
    (dict(without_concept="all"), "share 9 recording"),
    (dict(sae="nosae"), r"--sae .*nosae: no such folder"),
    (dict(sae="half"), r"sae\.safetensors is missing"),
    (dict(sae="notasite"), r"--site: the --sae folder's name 'notasite' is not a site"),
    (dict(site="encoder.block.0"), "--site: "),
    (dict(family="whisperx"), "--family whisperx: unknown"),
    (dict(out="afile"), "--out .*afile: is a file"),
    (dict(n_permutations="-1"), "--n-permutations -1"),
    (dict(alpha="0"), r"--alpha 0\.0: give a false discovery rate"),
    (dict(alpha="nan"), r"--alpha nan"),
    (dict(top_k="0"), "--top-k 0: give at least 1"),
    (dict(n_splits="1"), "--n-splits 1: give at least 2"),
    (dict(n_boot="5"), "--n-boot 5: give at least 10"),
])
def test_cli_concept_checks_every_argument_before_any_model_loads(tiny, concept_inputs, tmp_path, capsys,
                                                                   change, message):
    root, high, low, sae_dir = concept_inputs
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "cfg.json").write_text((sae_dir / "cfg.json").read_text())
    save_sae(build("topk", d_in=32, expansion=2, k=8), tmp_path / "notasite")
    named = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "high": high, "all": root,
             "nosae": tmp_path / "nosae", "half": tmp_path / "half", "notasite": tmp_path / "notasite",
             "afile": tmp_path / "afile"}
    args = {"with_concept": high, "without_concept": low, "sae": sae_dir, "out": tmp_path / "out",
            "model": "some-real-model"}
    args.update({k: named.get(v, v) for k, v in change.items()})
    flags = {"with_concept": "--with", "without_concept": "--without"}
    argv = ["concept"] + [x for k, v in args.items() for x in (flags.get(k, "--" + k.replace("_", "-")), str(v))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("affectlens: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err
    # with nothing wrong the checks pass and the model is what is reached next
    with pytest.raises(ModelLoaded):
        main(["concept", "--with", str(high), "--without", str(low), "--sae", str(sae_dir), "--model", "some-real-model",
              "--out", str(tmp_path / "out")])


# -- config, settings, UI -----------------------------------------------------------------------

CONFIG = {
    "datasets": {"demo": {"source": "demo"}, "other": {"source": "demo"}},
    "models": {"tiny": {"family": "whisper", "source": "x", "sites": ["encoder.blocks.0.resid_post"],
                        "sae_sites": ["encoder.blocks.0.resid_post"]},
               "plain": {"family": "whisper", "source": "x", "sites": ["encoder.blocks.0.resid_post"]}},
    "studies": {"a": {"datasets": ["demo"], "models": ["tiny"]}},
}


def test_concept_sae_defaults_and_errors_name_the_key():
    cfg = json.loads(json.dumps(CONFIG))
    cfg["concepts"] = {"x": {"with_concept": "a", "without_concept": "b", "model": "tiny"}}
    assert concept_sae(cfg, "x") == ("demo", "tiny", "encoder.blocks.0.resid_post")
    cfg["concepts"]["x"]["dataset"] = "other"
    assert concept_sae(cfg, "x")[0] == "other"
    bad = [({"model": "nope"}, r"concepts\.x\.model names 'nope'"),
           ({"model": "plain", "dataset": "demo"}, r"models\.plain\.sae_sites is empty"),
           ({"site": "encoder.blocks.1.resid_post"}, r"concepts\.x\.site = .* is not among models\.tiny\.sae_sites"),
           ({"dataset": "nope"}, r"concepts\.x\.dataset names 'nope'"),
           ({"without_concept": "a"}, "the same folder")]
    for change, message in bad:
        c = {**cfg["concepts"]["x"], **change}
        with pytest.raises(ConfigError, match=message):
            check_config({**cfg, "concepts": {"x": c}})
    cfg["models"]["plain"]["sae_sites"] = ["encoder.blocks.0.resid_post"]
    with pytest.raises(ConfigError, match=r"concepts\.x: no study lists model 'plain'"):
        concept_sae({**cfg, "concepts": {"x": {"with_concept": "a", "without_concept": "b", "model": "plain"}}}, "x")


def test_concept_settings_fill_the_schemas_defaults():
    c = ConceptConfig.from_dict({"with_concept": "a", "without_concept": "b", "model": "m"})
    assert (c.site, c.group_by, c.n_permutations, c.n_boot, c.alpha, c.top_k) == (None, "subfolder", None, 1000,
                                                                                 0.05, 10)
    with pytest.raises(ValueError, match=r"concepts\.<name>: missing required key\(s\) \['model'\]"):
        ConceptConfig.from_dict({"with_concept": "a", "without_concept": "b"})


def test_the_ui_lists_finished_concepts(tmp_path):
    from affectlens.ui.index import index_results

    for name in ("done", "half"):
        (tmp_path / "concepts" / name).mkdir(parents=True)
        (tmp_path / "concepts" / name / "features.tsv").write_text("x")
        (tmp_path / "concepts" / name / "dashboard.html").write_text("x")
    (tmp_path / "concepts" / "done" / "summary.json").write_text("{}")
    idx = index_results(tmp_path)
    assert idx["concepts"] == [{"name": "done", "dashboard": "concepts/done/dashboard.html", "figure": None,
                                "features": "concepts/done/features.tsv", "probe": None,
                                "summary": "concepts/done/summary.json"}]


# -- the workflow rule on a tiny config -----------------------------------------------------------

@pytest.mark.workflow
@pytest.mark.slow
def test_the_workflow_rule_reuses_the_sae_and_reruns_on_a_new_recording(tmp_path):
    from test_workflow import tiny_whisper

    work = tmp_path
    tone_folders(work / "tones", speakers=4, per_side=4)
    cfg = {
        "datasets": {"demo": {"source": "demo", "demo": {"speakers": ["en-us+m3", "en-us+f2"], "n_sentences": 2}}},
        "models": {"tiny": {"family": "whisper", "source": str(tiny_whisper(work / "tiny-whisper")),
                            "sites": ["encoder.blocks.0.resid_post"], "sae_sites": ["encoder.blocks.0.resid_post"],
                            "batch_size": 4}},
        "studies": {"smoke": {"datasets": ["demo"], "models": ["tiny"]}},
        "sae": {"expansion": 2, "k": 4, "n_samples": 20000, "batch_size": 256, "fidelity_clips": 0},
        "concepts": {"tones": {"with_concept": "tones/high", "without_concept": "tones/low", "model": "tiny",
                               "n_boot": 200, "top_k": 4, "top_clips": 2}},
    }
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))

    def snakemake(*args):
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
               "--configfile", str(work / "tiny.yaml"), "--cores", "2", *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=work)

    run = snakemake("results/concepts/tones")
    assert run.returncode == 0, run.stderr[-4000:]
    out = work / "results/concepts/tones"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sae"] == "results/sae/demo/tiny/encoder.blocks.0.resid_post"  # the workflow's own SAE
    assert summary["site"] == "encoder.blocks.0.resid_post" and summary["n_with"] == summary["n_without"] == 16
    assert summary["n_groups"] == 4 and "within each of the 4 groups" in summary["null"]
    feats = pd.read_csv(out / "features.tsv", sep="\t")
    assert len(feats) == 64 and list(feats["rank"]) == list(range(64))
    assert feats.iloc[0]["auroc"] >= 0.9 and feats.iloc[0]["significant"]
    assert (feats.loc[feats["tested"], "p_value"] >= summary["p_resolution"]).all()
    probe = pd.read_csv(out / "probe.tsv", sep="\t")
    assert list(probe["k"]) == [1, 2, 4] and probe.loc[probe["k"] == 4, "auroc"].item() >= 0.9
    top = pd.read_csv(out / "top_clips.tsv", sep="\t")
    assert set(top["feature"]) <= set(feats["feature"].head(4))
    assert (work / "benchmarks/concepts/tones.tsv").is_file()
    assert (work / "results/sae/demo/tiny/encoder.blocks.0.resid_post/metrics.json").is_file()
    again = snakemake("-n", "results/concepts/tones")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    # one more recording: the concept reruns, and nothing upstream of it
    tone(work / "tones/high/spk0/new.wav", 360, seed=999)
    dry = snakemake("results/concepts/tones", "-n", "--quiet", "rules")
    jobs = {line.split()[0] for line in (dry.stdout + dry.stderr).splitlines()
            if line.strip() and line.split()[0] in {"raw", "manifest", "decode", "extract", "sae", "concepts"}}
    assert dry.returncode == 0 and jobs == {"concepts"}, dry.stdout + dry.stderr
