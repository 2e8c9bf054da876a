"""MELD annotations through `datasets` (a Hub dataset with the published columns, e.g.
TwinkStart/MELD): the same annotation table as the published CSVs. The Hub is out of reach here,
so the dataset is a local folder in the Hub's parquet layout (`data/{split}-*.parquet`), built from
the real CSVs in ../shared/data/meld."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from affectlens.data import meld, sources
from affectlens.data.annotations import AnnotationError, read_table

pytest.importorskip("datasets")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "meld"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


def hub_folder(root: Path, drop: tuple[str, ...] = ()) -> Path:
    from datasets import Dataset

    for split, hub in HUB_SPLITS.items():
        table = read_table(SHARED / f"{split}_sent_emo.csv")
        for col in ("Sr No.", "Dialogue_ID", "Utterance_ID", "Season", "Episode"):
            table[col] = table[col].astype("int64")  # typed as on the Hub
        table["WavPath"] = [f"audio/{split}/{i}.wav" for i in range(len(table))]  # extra columns are dropped
        (root / "data").mkdir(parents=True, exist_ok=True)
        Dataset.from_pandas(table.drop(columns=list(drop)), preserve_index=False).to_parquet(
            root / "data" / f"{hub}-00000-of-00001.parquet")
    return root


def test_hub_annotations_equal_the_published_csvs(tmp_path):
    raw = tmp_path / "raw"
    (tmp_path / "no-clips").mkdir()  # the clips are not the point here
    sources.fetch(raw, "meld", {"source": "meld", "meld": {"annotations_hub": str(hub_folder(tmp_path / "hub")),
                                                           "root": str(tmp_path / "no-clips")}})
    from_hub = meld.annotation_table(meld._tables(raw, meld.SPLITS), "meld", "emotion")
    published = tmp_path / "published"
    published.mkdir()
    for split in meld.SPLITS:
        (published / "annotations").mkdir(exist_ok=True)
        (published / "annotations" / f"{split}_sent_emo.csv").write_bytes((SHARED / f"{split}_sent_emo.csv").read_bytes())
    from_csv = meld.annotation_table(meld._tables(published, meld.SPLITS), "meld", "emotion")
    assert from_hub.groupby("split").size().to_dict() == {"train": 9989, "dev": 1109, "test": 2610}
    pd.testing.assert_frame_equal(from_hub.drop(columns="source_table"), from_csv.drop(columns="source_table"))


def test_a_hub_dataset_without_the_published_columns_is_refused(tmp_path):
    hub = hub_folder(tmp_path / "hub", drop=("Speaker",))
    with pytest.raises(AnnotationError, match=r"columns \['Speaker'\] are missing"):
        meld.annotations_from_hub(str(hub), tmp_path / "out", ("test",))
    assert not list((tmp_path / "out").glob("*.csv"))
