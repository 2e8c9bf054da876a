"""Bad input: every broken audio file, annotation table, config and model file ends in a clear
error naming the file or key, or in a recorded rejection (`{dataset}.rejected.tsv`), never in a
bare traceback or silent acceptance."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import yaml
from snakemake.utils import validate

from affectlens import stages
from affectlens.config import check_config
from affectlens.data import checks, decode
from affectlens.data.annotations import AnnotationError
from affectlens.data.manifest import ManifestError, read_manifest, read_rejections, safe_clip_id

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
torch.set_num_threads(1)


def tone(seconds, sr=16000, freq=220.0, amp=0.3, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return x if channels == 1 else np.stack([x * (1 + c) / channels for c in range(channels)], 1)


def config(**dataset) -> dict:
    cfg = {"datasets": {"d": dataset}, "models": {"m": {"family": "whisper", "source": "x", "sites": ["encoder.embed"]}},
           "studies": {"s": {"datasets": ["d"], "models": ["m"]}}}
    validate(cfg, str(SCHEMA))  # fills the schema's defaults, as the workflow does
    return cfg


def run_manifest(tmp_path, cfg):
    raw, out = tmp_path / "raw", tmp_path / "results" / "manifest"
    stages.data.raw("d", cfg["datasets"]["d"], raw)
    stages.data.manifest(raw, "d", cfg["datasets"]["d"], out / "d.tsv", out / "d.rejected.tsv")
    return read_manifest(out / "d.tsv"), read_rejections(out / "d.rejected.tsv")


# --- audio ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """One label folder holding every kind of bad file, and good files in odd formats."""
    root = tmp_path_factory.mktemp("rec")
    d = root / "happy"
    d.mkdir()
    (d / "empty.wav").write_bytes(b"")                                      # 0 bytes
    sf.write(d / "zero.wav", np.zeros(0, np.float32), 16000)                # a header, no samples
    sf.write(d / "silent.wav", np.zeros(16000, np.float32), 16000)
    x = tone(1.0)
    x[100] = np.nan
    sf.write(d / "nan.wav", x, 16000, subtype="FLOAT")
    x = tone(1.0)
    x[5] = np.inf
    sf.write(d / "inf.wav", x, 16000, subtype="FLOAT")
    (d / "text.wav").write_text("this is a README, not audio\n" * 40)
    (d / "mp3.flac").write_bytes(os.urandom(4096))                          # noise under an audio name
    # 2 hours, cheaply: 1 kHz 8-bit (7.2 MB); decoding it would make 460 MB of 16 kHz float32
    with sf.SoundFile(d / "long.wav", "w", samplerate=1000, channels=1, subtype="PCM_U8") as f:
        block = tone(600.0, sr=1000, freq=50.0)
        for _ in range(12):
            f.write(block)
    # good ones: other rates, 8-bit, 6 channels
    sf.write(d / "sr22050.wav", tone(1.0, 22050), 22050)
    sf.write(d / "sr8000.wav", tone(1.0, 8000, freq=300.0), 8000)
    sf.write(d / "u8.wav", tone(1.0), 16000, subtype="PCM_U8")
    sf.write(d / "six.wav", tone(1.0, channels=6), 16000)
    return root


BAD = {"happy/empty": "empty file (0 bytes)", "happy/zero": "empty: no audio samples",
       "happy/silent": "silent: ", "happy/nan": "contains NaN or Inf samples (1 of",
       "happy/inf": "contains NaN or Inf samples (1 of", "happy/text": "not decodable as audio",
       "happy/mp3": "not decodable as audio",
       "happy/long": "too long: 7200.0 s > max_duration 30.0 s (from the file header; not decoded)"}
GOOD = ["happy/six", "happy/sr22050", "happy/sr8000", "happy/u8"]


def test_bad_audio_is_rejected_with_its_reason_and_a_2_hour_file_is_never_decoded(recordings, tmp_path,
                                                                                   monkeypatch):
    decoded = []
    real = checks.decode_clip
    monkeypatch.setattr(checks, "decode_clip", lambda path, *a, **k: decoded.append(Path(path).name) or
                        real(path, *a, **k))
    m, rejected = run_manifest(tmp_path, config(source="folder", folder={"root": str(recordings)}))
    assert sorted(m["source_clip_id"]) == GOOD  # ids made safe as file names: happy/six -> happy_six-<digest>
    assert m["clip_id"].tolist() == [safe_clip_id(c) for c in m["source_clip_id"]]
    why = dict(zip(rejected["clip_id"], rejected["reason"]))
    assert set(why) == {safe_clip_id(c) for c in BAD}
    for clip, reason in BAD.items():
        assert reason in why[safe_clip_id(clip)], (clip, why[safe_clip_id(clip)])
    assert "text.wav" in why[safe_clip_id("happy/text")] and "mp3.flac" in why[safe_clip_id("happy/mp3")]
    assert "long.wav" not in decoded and "empty.wav" not in decoded
    assert (tmp_path / "results/manifest/d.rejected.tsv").read_text().startswith("clip_id\tpath\treason\tsource_clip_id\n")


def test_decode_stage_resamples_mixes_down_and_scales_8_bit_deliberately(recordings, tmp_path):
    """Other sample rates are resampled to 16 kHz (documented: the decode stage writes 16 kHz mono
    FLAC), channels are averaged, unsigned 8-bit is centred; the 2-hour file is turned away here
    too, from its header."""
    rows = [{"clip_id": n, "dataset": "d", "path": str(recordings / f"{n}.wav"), "split": "all", "label": "happy",
             "speaker": "s", "pair_key": None, "text": "", "start": np.nan, "end": np.nan, "duration": np.nan}
            for n in ("happy/sr22050", "happy/sr8000", "happy/u8", "happy/six", "happy/long")]
    out, bad = decode.decode_manifest(pd.DataFrame(rows), tmp_path / "out", progress=False)
    assert [r["clip_id"] for r in bad] == ["happy/long"] and "not decoded" in bad[0]["reason"]
    for row in out.itertuples():
        y, sr = sf.read(row.path, dtype="float32")
        assert sr == 16000 and y.ndim == 1 and abs(len(y) - 16000) <= 2, row.clip_id
    y = {r.clip_id: sf.read(r.path, dtype="float32")[0] for r in out.itertuples()}
    ref = tone(1.0)
    np.testing.assert_allclose(y["happy/u8"], ref, atol=1 / 64)            # not offset by 128, not rescaled
    np.testing.assert_allclose(y["happy/six"], ref * 3.5 / 6, atol=1e-3)    # mean of the 6 channels
    np.testing.assert_allclose(y["happy/sr22050"][200:-200], ref[200:-200], atol=2e-3)
    rms = float(np.sqrt(np.mean(y["happy/sr8000"] ** 2)))
    assert abs(rms - 0.3 / np.sqrt(2)) < 0.01


# --- annotations ----------------------------------------------------------------------------------

@pytest.fixture()
def csv_root(tmp_path):
    rec = tmp_path / "rec"
    rec.mkdir()
    for i in range(3):
        sf.write(rec / f"{i}.wav", tone(0.8, freq=200 + 50 * i), 16000)
    return rec


def _csv_config(tmp_path, csv_root, text: str | bytes, **folder):
    path = tmp_path / "labels.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return config(source="folder", folder={"root": str(csv_root), "csv": str(path), **folder})


def test_a_csv_with_a_bom_and_stray_whitespace_reads_as_clean_labels(tmp_path, csv_root):
    text = "\ufeffpath,label,speaker\n0.wav, happy ,s1\n1.wav,sad\t,s2\n2.wav,happy,s3\n"
    m, rejected = run_manifest(tmp_path, _csv_config(tmp_path, csv_root, text.encode("utf-8")))
    assert m["label"].tolist() == ["happy", "sad", "happy"] and m["speaker"].tolist() == ["s1", "s2", "s3"]
    assert len(rejected) == 0


def test_labels_that_differ_only_in_case_are_refused(tmp_path, csv_root):
    cfg = _csv_config(tmp_path, csv_root, "path,label,speaker\n0.wav,Happy,s1\n1.wav,sad,s2\n2.wav,happy,s3\n")
    with pytest.raises(ManifestError, match=r"dataset 'd'.*labels \['Happy', 'happy'\] differ only in case"):
        run_manifest(tmp_path, cfg)


def test_unknown_labels_and_duplicate_clips_name_the_file_and_the_value(tmp_path, csv_root):
    cfg = _csv_config(tmp_path, csv_root, "path,label\n0.wav,happy\n1.wav,elated\n", labels=["happy", "sad"])
    with pytest.raises(AnnotationError, match=r"labels\.csv: column 'label' has unknown value\(s\) \['elated'\]"):
        run_manifest(tmp_path, cfg)
    cfg = _csv_config(tmp_path, csv_root, "path,label\n0.wav,happy\n1.wav,sad\n0.wav,sad\n")
    with pytest.raises(ManifestError, match=r"dataset 'd'.*clip_id is not unique; duplicated: \['0'\]"):
        run_manifest(tmp_path, cfg)


def test_a_missing_label_cell_names_the_file_and_row(tmp_path, csv_root):
    cfg = _csv_config(tmp_path, csv_root, "path,label\n0.wav,happy\n1.wav,  \n")
    with pytest.raises(AnnotationError, match=r"labels\.csv: column 'label' is empty in rows \[1\]"):
        run_manifest(tmp_path, cfg)


# --- config ---------------------------------------------------------------------------------------

def _tiny_config() -> dict:
    return yaml.safe_load("""
datasets: {demo: {source: demo, demo: {speakers: [en-us+m3, en-us+f2], n_sentences: 2, emotions: [sad, happy]}}}
models: {m: {family: whisper, source: x, sites: [encoder.embed, encoder.blocks.*.resid_post]}}
studies: {s: {datasets: [demo], models: [m], contrasts: [{source: sad, target: happy}]}}
""")


def _check(cfg):
    validate(cfg, str(SCHEMA))
    check_config(cfg)


@pytest.mark.parametrize("edit, error, message", [
    (lambda c: c["probe"].update(n_split=3), "WorkflowError", r"'n_split' was unexpected"),
    (lambda c: c.update(prob={"C": 1}), "WorkflowError", r"'prob' was unexpected"),
    (lambda c: c["probe"].update(n_permutations="ten"), "WorkflowError",
     r"(?s)'ten' is not of type 'integer'.*On instance\['probe'\]\['n_permutations'\]"),
    (lambda c: c["sae"].update(expansion=2.5), "WorkflowError",
     r"(?s)2\.5 is not of type 'integer'.*On instance\['sae'\]\['expansion'\]"),
    (lambda c: c["models"]["m"].update(sites=["encoder.blocks.0.resid_pre"]), "ConfigError",
     r"models\.m\.sites: .*resid_pre"),
    # a misshapen site is refused by the schema's pattern (the site grammar's), naming the key
    (lambda c: c["models"]["m"].update(sae_sites=["encoder.block.0.resid_post"]), "WorkflowError",
     r"(?s)'encoder\.block\.0\.resid_post' does not match.*On instance\['models'\]\['m'\]\['sae_sites'\]\[0\]"),
    (lambda c: c["studies"]["s"]["contrasts"].append({"source": "sad", "target": "elated"}), "ConfigError",
     r"studies\.s\.contrasts\[1\] names label 'elated', which dataset 'demo' does not have"),
    (lambda c: c["studies"]["s"].update(models=["nope"]), "ConfigError", r"studies\.s\.models names 'nope'"),
    (lambda c: (c["steer"].update(methods=["sae"]), c["models"]["m"].update(steer_site="encoder.blocks.0.resid_post")),
     "ConfigError", r"steer\.methods lists sae.*models\.m\.sae_sites does not list its steer_site"),
    (lambda c: c["steer"].update(methods=["diff_of_means", "mean"]), "WorkflowError",
     r"(?s)'mean' is not one of.*\['steer'\]\['methods'\]"),
    (lambda c: c["studies"]["s"].update(datasets=[]), "WorkflowError", r"\[\] should be non-empty"),
    (lambda c: c.update(studies={}), "WorkflowError", r"\{\} should be non-empty"),
])
def test_bad_configs_name_the_key(edit, error, message):
    cfg = _tiny_config()
    _check(json.loads(json.dumps(cfg)))  # the unedited config is fine
    validate(cfg, str(SCHEMA))  # defaults filled, so edits of sections land in them
    edit(cfg)
    with pytest.raises(Exception) as e:
        _check(cfg)
    assert type(e.value).__name__ == error, e.value
    assert e.match(message)


def test_a_layer_past_the_models_depth_stops_extraction_naming_the_site(tmp_path):
    from test_extract import tiny_adapter

    from affectlens.extract import extract_store
    from affectlens.models.sites import SiteError
    from test_adapters_common import manifest_of

    manifest, lookup = manifest_of([tone(0.5)])
    with pytest.raises(SiteError, match=r"'encoder\.blocks\.7\.resid_post': block 7 is past the model's depth "
                                        r"\(encoder has blocks 0\.\.1\)"):
        extract_store(manifest, tiny_adapter(), ["encoder.blocks.7.resid_post"], tmp_path / "s.h5",
                      load_wave=lookup.__getitem__, progress=False)
    assert list(tmp_path.iterdir()) == []


# --- model files ----------------------------------------------------------------------------------

class Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _sae(tmp_path):
    from affectlens.sae.registry import build
    from affectlens.sae.train import fit_array

    sae = build("topk", d_in=8, expansion=2, k=2, n_samples=512, batch_size=128)
    state = fit_array(sae, np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32))
    return sae, state


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    from affectlens.sae.registry import build
    from affectlens.sae.train import CheckpointError, load_checkpoint

    marker = tmp_path / "pwned"
    sae = build("topk", d_in=8, expansion=2, k=2)
    torch.save({"architecture": "topk", "cfg": sae.cfg.to_dict(), "sae": {}, "optimizer": Evil(marker)},
               tmp_path / "ck.pt")
    with pytest.raises(CheckpointError, match=r"ck\.pt cannot be loaded safely .*UnpicklingError"):
        load_checkpoint(tmp_path / "ck.pt", sae)
    assert not marker.exists()


def test_model_weights_that_would_run_code_or_do_not_fit_the_config_are_refused(tmp_path):
    from test_extract import tiny_adapter
    from transformers import Wav2Vec2Model

    from affectlens.models.loading import load_pretrained

    model = tiny_adapter().model
    folder = tmp_path / "pickled"
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({**model.state_dict(), "x": Evil(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(RuntimeError, match=rf"{folder}.*unsupported GLOBAL posix\.system.*refused"):
        load_pretrained(Wav2Vec2Model, str(folder))
    assert not marker.exists()

    folder = tmp_path / "mismatch"
    model.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64, "intermediate_size": 96}))
    with pytest.raises(RuntimeError, match=rf"cannot load the model in {folder} as Wav2Vec2Model: .*mismatched"):
        load_pretrained(Wav2Vec2Model, str(folder))


def test_sae_artifacts_are_safetensors_and_json_and_a_shape_mismatch_names_both_files(tmp_path):
    from affectlens.sae.registry import load_sae, save_sae
    from affectlens.sae.train import CheckpointError, load_checkpoint, save_checkpoint

    sae, state = _sae(tmp_path)
    save_sae(sae, tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae.safetensors"]
    assert (tmp_path / "sae/sae.safetensors").read_bytes()[8:9] == b"{"  # a JSON header, no pickle
    cfg = json.loads((tmp_path / "sae/cfg.json").read_text())
    (tmp_path / "sae/cfg.json").write_text(json.dumps({**cfg, "d_in": 16}))
    with pytest.raises(ValueError, match=r"(?s)sae\.safetensors does not match .*cfg\.json \(topk, d_in=16\).*"
                                         r"size mismatch for W_enc"):
        load_sae(tmp_path / "sae")
    (tmp_path / "sae/cfg.json").write_text(json.dumps({**cfg, "k": "four"}))
    with pytest.raises(ValueError, match=r"cfg\.json: not a valid SAE config"):
        load_sae(tmp_path / "sae")

    save_checkpoint(tmp_path / "ck.pt", sae, state)
    other, _ = _sae(tmp_path)
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    ck["sae"]["W_enc"] = torch.zeros(3, 3)
    torch.save(ck, tmp_path / "ck.pt")
    with pytest.raises(CheckpointError, match=r"(?s)ck\.pt: weights do not match its config.*W_enc"):
        load_checkpoint(tmp_path / "ck.pt", other)


def test_a_contrast_naming_a_label_the_data_lacks_stops_patching_naming_the_label():
    """check_config catches this for the demo corpus from the config alone; for a real dataset
    the labels are known once its manifest exists, and the patch stage stops there."""
    from affectlens.patching.pairs import make_pairs

    manifest = pd.DataFrame({"clip_id": ["a", "b"], "label": ["sad", "happy"], "speaker": ["s", "s"],
                             "pair_key": ["k", "k"]})
    with pytest.raises(ValueError, match=r"contrast names label 'elated', which the dataset does not have; "
                                         r"its labels are \['happy', 'sad'\]"):
        make_pairs(manifest, "sad", "elated")
