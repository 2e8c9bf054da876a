"""The manifest: one row per clip, the table every stage after download reads.

Columns (dataset-specific extras such as valence, arousal, intensity may follow):
    clip_id   unique id, used as file stem and store index: made safe here (see `safe_clip_id`);
              where an id had to change, `source_clip_id` keeps the one the source gave
    dataset   the {dataset} wildcard
    path      audio (or video) file holding the clip
    split     dataset-given split ("train", "test", ...) or "all"
    label     class label (emotion, ...); empty when the dataset has none
    speaker   drives grouped cross-validation: no speaker in both train and test
    pair_key  same speaker and sentence, different label: drives counterfactual pairs
    text      transcript, when known
    start     clip start in seconds within `path`; empty = start of file
    end       clip end in seconds within `path`; empty = end of file
    duration  seconds

Stored as TSV. An empty cell reads back as missing (NaN), so `dropna(subset=["pair_key"])`
keeps exactly the rows that have a pair key.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd

from affectlens.io import atomic_open

MANIFEST_COLUMNS = ("clip_id", "dataset", "path", "split", "label", "speaker", "pair_key", "text",
                    "start", "end", "duration")
_TEXT_COLUMNS = ("clip_id", "dataset", "path", "split", "label", "speaker", "pair_key", "text")
_NUMERIC_COLUMNS = ("start", "end", "duration")
_NONEMPTY_COLUMNS = ("clip_id", "dataset", "path")
REJECTION_COLUMNS = ("clip_id", "path", "reason")
MAX_CLIP_ID = 100  # room in a 255-byte file name for the suffixes later stages add
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]+")


class ManifestError(ValueError):
    """A manifest that breaks the schema; the message names the file and the rows at fault."""


def is_safe_clip_id(clip_id: str) -> bool:
    """A plain file stem on every system: ASCII letters, digits and `._-` only (no separator, no
    control character, no `..`, hidden or option-like name), no `__` (later stages join names with it, see
    affectlens.naming), at most MAX_CLIP_ID characters."""
    return (bool(_SAFE_ID.fullmatch(clip_id)) and not clip_id.startswith((".", "-")) and "__" not in clip_id
            and len(clip_id) <= MAX_CLIP_ID)


def safe_clip_id(clip_id) -> str:
    """`clip_id` itself when it is safe as a file stem, else a readable safe stem plus a stable
    digest of the original (`../x/a b` -> `x_a_b-<8 hex>`), so distinct ids stay distinct."""
    clip_id = str(clip_id)
    if is_safe_clip_id(clip_id):
        return clip_id
    digest = hashlib.sha256(clip_id.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    stem = re.sub(r"_{2,}", "_", re.sub(r"[^A-Za-z0-9._-]+", "_", clip_id)).strip("._-")
    stem = stem[: MAX_CLIP_ID - len(digest) - 1].rstrip("._-")
    return f"{stem or 'clip'}-{digest}"


def _make_ids_safe(df: pd.DataFrame) -> pd.DataFrame:
    ids = df["clip_id"].astype(str)
    safe = ids.map(safe_clip_id)
    changed = safe != ids
    if changed.any():
        kept = df["source_clip_id"] if "source_clip_id" in df.columns else pd.Series(pd.NA, index=df.index)
        df["source_clip_id"] = kept.where(kept.notna() | ~changed, ids).astype(object)
        df["clip_id"] = safe
    return df


def validate_manifest(df: pd.DataFrame, source: str = "manifest") -> pd.DataFrame:
    """Check the schema and return a cleaned copy (required columns first, labels stripped).

    `source` names the file (or builder) in error messages.
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{source}: missing required column(s) {missing}; "
                            f"a manifest needs {list(MANIFEST_COLUMNS)}")
    df = df[list(MANIFEST_COLUMNS) + [c for c in df.columns if c not in MANIFEST_COLUMNS]].copy()
    for col in _NONEMPTY_COLUMNS:
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if empty.any():
            rows = df.index[empty].tolist()[:5]
            raise ManifestError(f"{source}: column {col!r} is empty in row(s) {rows}; every clip needs a {col}")
    dup = df["clip_id"][df["clip_id"].duplicated(keep=False)]
    if len(dup):
        names = sorted(set(dup.astype(str)))
        shown = names[:10] + (["..."] if len(names) > 10 else [])
        raise ManifestError(f"{source}: clip_id is not unique; duplicated: {shown}. "
                            "Make clip ids unique (e.g. prefix the speaker or session)")
    # Ids become file names in later stages: no separators, `..`, absolute paths or control characters.
    df = _make_ids_safe(df)
    clash = df["clip_id"][df["clip_id"].duplicated(keep=False)]
    if len(clash):
        raise ManifestError(f"{source}: clip ids {sorted(set(clash))[:10]} clash once made safe as file names; "
                            "rename the clips")
    # Stray spaces ("happy " vs "happy") would silently split one class into two.
    for col in ("label", "speaker", "pair_key", "split"):
        df[col] = df[col].where(df[col].isna(), df[col].astype(str).str.strip())
    # Nor may case ("Happy" vs "happy"): say so rather than guess which spelling is meant.
    labels = pd.Series(sorted(set(df["label"].dropna().astype(str)) - {""}), dtype=str)
    clash = labels[labels.str.casefold().duplicated(keep=False)]
    if len(clash):
        raise ManifestError(f"{source}: labels {clash.tolist()} differ only in case and would be separate classes; "
                            "spell each label one way in the annotations")
    for col in _NUMERIC_COLUMNS:
        try:
            df[col] = pd.to_numeric(df[col])
        except (ValueError, TypeError) as e:
            raise ManifestError(f"{source}: column {col!r} must hold numbers (seconds): {e}") from e
    return df.reset_index(drop=True)


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Validate and write the manifest as TSV (atomically)."""
    path = Path(path)
    df = validate_manifest(df, source=f"manifest for {path}")
    with atomic_open(path, "w") as f:
        df.to_csv(f, sep="\t", index=False)
    return path


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and validate a manifest TSV; errors name the file and what is wrong."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest {path} does not exist; run the manifest rule for its dataset")
    try:
        df = pd.read_csv(path, sep="\t", dtype={c: str for c in (*_TEXT_COLUMNS, "source_clip_id")})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not a readable TSV manifest ({e}); delete it and rerun the manifest rule") from e
    return validate_manifest(df, source=str(path))


def write_rejections(rows: Iterable[Mapping], path: str | Path) -> Path:
    """Write `{dataset}.rejected.tsv`: one row per clip left out, with the reason (header even if none).
    Clip ids are the manifest's safe ones (`safe_clip_id`); source_clip_id keeps one that changed."""
    rows = [dict(r) for r in rows]
    for r in rows:
        cid = str(r["clip_id"])
        if safe_clip_id(cid) != cid:
            r.update(clip_id=safe_clip_id(cid), source_clip_id=r.get("source_clip_id") or cid)
    df = pd.DataFrame(rows)
    for col in REJECTION_COLUMNS:
        if col not in df.columns:
            df[col] = pd.Series(dtype=str)
    df = df[list(REJECTION_COLUMNS) + [c for c in df.columns if c not in REJECTION_COLUMNS]]
    with atomic_open(path, "w") as f:
        df.to_csv(f, sep="\t", index=False)
    return Path(path)


def read_rejections(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
