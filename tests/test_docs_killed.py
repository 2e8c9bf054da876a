"""The docs' "When a run was killed" (docs/reruns.md; issue 20.7): the section exists, names the commands
to run, and the temporary names, resumable parts and checkpoint path it cites are the ones the code uses."""

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _section() -> str:
    text = (ROOT / "docs" / "reruns.md").read_text()
    m = re.search(r"^## When a run was killed\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert m, "docs/reruns.md lacks the section 'When a run was killed'"
    return " ".join(m.group(1).split())


def test_the_section_says_what_to_run():
    s = _section()
    for text in ("snakemake --unlock", "--rerun-incomplete", "LockException", "IncompleteFilesException",
                 ".snakemake/locks/", ".snakemake/incomplete/", "orphans", "never half a file"):
        assert text in s, text


def test_the_names_it_cites_are_the_codes(tmp_path):
    from affectlens import io, store
    from affectlens.data import download
    from affectlens.sae import train

    s = _section()
    tmp = io._temp_name(tmp_path / "table.tsv")
    assert re.fullmatch(r"\.table\.[0-9a-f]{8}\.partial\.tsv", tmp.name) and ".{name}.{8 hex}.partial{suffix}" in s
    assert download.part_path(tmp_path / "x.zip").name == "x.zip.part" and "`{name}.part`" in s
    assert 'name + ".partial"' in Path(store.__file__).read_text() and "`{name}.h5.partial`" in s
    assert 'name + ".tmp"' in Path(train.__file__).read_text() and "`{name}.pt.tmp`" in s
    extract = (ROOT / "src/affectlens/extract.py").read_text()
    assert 'out_path.name + ".parts"' in extract and 'parts_dir / "store.h5"' in extract
    assert "results/extract/{dataset}/{model}.h5.parts/store.h5" in s
    assert ('checkpoint="results/sae/{dataset}/{model}/.checkpoints/{site}.pt"'
            in (ROOT / "workflow/rules/sae.smk").read_text())
    assert "results/sae/{dataset}/{model}/.checkpoints/{site}.pt" in s


def test_a_write_that_fails_leaves_the_old_file_and_no_temp(tmp_path):
    """What the section promises of io.atomic_path: the old file or the new, never half of one."""
    from affectlens.io import atomic_path

    out = tmp_path / "a.npy"
    np.save(out, np.zeros(3))
    with pytest.raises(RuntimeError), atomic_path(out) as t:
        t.write_bytes(b"half")
        raise RuntimeError("killed")
    assert np.load(out).tolist() == [0, 0, 0] and sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]
