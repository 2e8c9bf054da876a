"""Shared by every stage: a rule's log, atomic tables."""

from __future__ import annotations

import logging
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from affectlens import faults
from affectlens.io import atomic_path

log = logging.getLogger("affectlens")


@contextmanager
def logged(log_path: str | Path | None, threads: int = 1):
    """Send logging, warnings and progress bars (stderr) of one rule to its log file; a failure's
    traceback goes there too before the error propagates to Snakemake.

    A full, read-only or unwritable disk ends the job with one line naming the path (in the log and
    on stderr, exit status 1) instead. How the attempt ended is recorded for the job's retry
    (`affectlens.faults`): after an error a retry cannot fix (a config or data check, a missing file,
    a full disk) the retry stops at once with the same reason rather than running again with more
    memory."""
    try:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    except ModuleNotFoundError:  # the report environment has no torch and needs none
        pass
    if log_path is None:
        yield
        return
    last = faults.begin(log_path)
    try:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        f = open(log_path, "w", encoding="utf-8")
    except OSError as e:
        if faults.disk_error(e) is None:
            raise
        faults.record(log_path, "fatal", faults.disk_message(e))
        _say(faults.disk_message(e), sys.stderr)
        raise SystemExit(1) from None
    try:
        if last is not None and last[0] == "fatal":
            line = (f"affectlens: not retried: the previous attempt stopped on an error that a retry cannot fix "
                    f"({last[1]}); fix it and run again")
            faults.record(log_path, *last)
            _say(line, f, sys.stderr)
            raise SystemExit(1)
        old_err, old_out = sys.stderr, sys.stdout
        sys.stderr = sys.stdout = f
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
        logging.captureWarnings(True)
        try:
            yield
        except BaseException as e:
            disk = faults.disk_error(e)
            reason = faults.disk_message(disk) if disk is not None else f"{type(e).__name__}: {e}"
            faults.record(log_path, faults.classify(e), reason)
            if disk is None:
                traceback.print_exc(file=f)
                raise
            _say(reason, f, old_err)
            raise SystemExit(1) from None
        finally:
            logging.getLogger().removeHandler(handler)
            sys.stderr, sys.stdout = old_err, old_out
    finally:
        try:
            f.close()
        except OSError:  # a full disk may refuse the log's last bytes; the job's outcome stands
            pass


def _say(line: str, *streams) -> None:
    """Write one line to each stream that still takes it (a full disk may refuse the log)."""
    for s in streams:
        try:
            print(line, file=s, flush=True)
        except OSError:
            pass


def write_tsv(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False)
