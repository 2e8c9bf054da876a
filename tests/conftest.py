"""Fixtures shared across test files."""

import json

import pytest
import yaml


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for the module: small matmuls on a shared 2-core machine only contend."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_workflow(tmp_path_factory):
    """(workdir, config) of one real run of the Snakemake DAG on test_workflow's tiny config, once per
    session: test_workflow.py checks its outputs, test_ui.py browses its results folder."""
    from test_workflow import TINY, snakemake, tiny_whisper

    work = tmp_path_factory.mktemp("wf")
    cfg = json.loads(json.dumps(TINY))
    cfg["models"]["tiny"]["source"] = cfg["models"]["judge"]["source"] = str(tiny_whisper(work / "tiny-whisper"))
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    first = snakemake(work)
    assert first.returncode == 0, first.stderr[-4000:]
    return work, cfg
