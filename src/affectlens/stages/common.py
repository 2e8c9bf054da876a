"""Shared by every stage: a rule's log, atomic tables."""

from __future__ import annotations

import logging
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from affectlens.io import atomic_path

log = logging.getLogger("affectlens")


@contextmanager
def logged(log_path: str | Path | None, threads: int = 1):
    """Send logging, warnings and progress bars (stderr) of one rule to its log file; a failure's
    traceback goes there too before the error propagates to Snakemake."""
    try:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    except ModuleNotFoundError:  # the report environment has no torch and needs none
        pass
    if log_path is None:
        yield
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as f:
        old_err, old_out = sys.stderr, sys.stdout
        sys.stderr = sys.stdout = f
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
        logging.captureWarnings(True)
        try:
            yield
        except BaseException:
            traceback.print_exc(file=f)
            raise
        finally:
            logging.getLogger().removeHandler(handler)
            sys.stderr, sys.stdout = old_err, old_out


def write_tsv(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False)
