"""Stages of workflow/rules/data.smk: raw, manifest, decode, dynamic_ratings."""

from __future__ import annotations

import logging
from pathlib import Path


from affectlens.stages.common import write_tsv

log = logging.getLogger("affectlens")


def raw(dataset: str, dataset_cfg: dict, out_dir) -> None:
    """Build or download a dataset's raw files into out_dir: the demo corpus (with a manifest.tsv of
    what is there), or a real dataset downloaded, verified and extracted (affectlens.data.sources)."""
    from affectlens.data.manifest import write_manifest

    if dataset_cfg["source"] != "demo":
        from affectlens.data.sources import fetch

        fetch(out_dir, dataset, dataset_cfg)
        log.info("fetched %s (%s) into %s", dataset, dataset_cfg["source"], out_dir)
        return
    from affectlens.data.demo import DEFAULT_SENTENCES, build_demo_corpus

    d = dataset_cfg.get("demo", {})
    manifest = build_demo_corpus(out_dir, speakers=d["speakers"], emotions=d["emotions"],
                                 sentences=list(DEFAULT_SENTENCES[: d["n_sentences"]]), seed=d["seed"], dataset=dataset)
    write_manifest(manifest, Path(out_dir) / "manifest.tsv")
    log.info("built %d clips of %s into %s", len(manifest), dataset, out_dir)


MAX_LOGGED_REJECTIONS = 50


def record_rejections(rejections: list[dict], out_rejected, kept_rejected=None) -> None:
    """Write the rejections to out_rejected and to kept_rejected (a log, which Snakemake keeps when
    the job fails and deletes its outputs), and name the first ones in the log."""
    from affectlens.data.manifest import write_rejections

    write_rejections(rejections, out_rejected)
    if kept_rejected is not None:
        Path(kept_rejected).parent.mkdir(parents=True, exist_ok=True)
        write_rejections(rejections, kept_rejected)
    for r in rejections[:MAX_LOGGED_REJECTIONS]:
        log.warning("rejected %s (%s): %s", r["clip_id"], r["path"], r["reason"])
    if len(rejections) > MAX_LOGGED_REJECTIONS:
        log.warning("... and %d more rejected clips: see %s", len(rejections) - MAX_LOGGED_REJECTIONS,
                    kept_rejected or out_rejected)


def manifest(raw_dir, dataset: str, dataset_cfg: dict, out_manifest, out_rejected, kept_rejected=None) -> None:
    """The dataset's manifest, validated; annotations without a clip and clips that are missing,
    unreadable, empty, silent, mis-cut or out of the duration range are left out, each with its
    reason in out_rejected (and kept_rejected, a copy that survives a failed job). Clips that are
    texts alone (`sources.text_only`) have no media to check."""
    from affectlens.data.checks import check_clips
    from affectlens.data.manifest import read_manifest, validate_manifest, write_manifest
    from affectlens.data.sources import VIDEO_SOURCES, build, text_only

    source = dataset_cfg["source"]
    where = kept_rejected or out_rejected
    if source == "demo":
        m, rejections = read_manifest(Path(raw_dir) / "manifest.tsv"), []
    else:
        m, rejections = build(raw_dir, dataset, dataset_cfg)
        if m.empty:
            record_rejections(rejections, out_rejected, kept_rejected)
            raise ValueError(f"dataset {dataset!r}: no annotated clip found in {raw_dir}; the reasons are in "
                             f"{where} and the log")
        m = validate_manifest(m, source=f"{source} manifest of dataset {dataset!r} (from {raw_dir})")
    label_column = dataset_cfg["label_column"]
    if label_column not in m.columns:
        raise ValueError(f"datasets.{dataset}.label_column = {label_column!r} is not a manifest column "
                         f"({list(m.columns)})")
    if text_only(dataset, dataset_cfg):
        kept, bad = m, []
    else:
        kept, bad = check_clips(m, mode=dataset_cfg.get("clip_check", "decode"),
                                media="video" if source in VIDEO_SOURCES else "audio",
                                min_duration=dataset_cfg.get("min_duration", 0.2),
                                max_duration=dataset_cfg.get("max_duration", 30.0),
                                max_mismatch=dataset_cfg.get("max_duration_mismatch"),
                                jobs=dataset_cfg.get("check_jobs", 1))
    record_rejections(rejections + bad, out_rejected, kept_rejected)
    if kept.empty:
        raise ValueError(f"dataset {dataset!r}: none of {len(m)} clips is usable; the reasons are in {where} "
                         "and the log")
    write_manifest(kept, out_manifest)
    log.info("%s: %d clips, %d left out (see %s)", dataset, len(kept), len(rejections) + len(bad), out_rejected)


def decode(manifest_path, dataset_cfg: dict, out_audio, out_frames, out_manifest, out_rejected,
           threads: int = 1, kept_rejected=None, dataset: str = "") -> None:
    """Decode every clip's audio to 16 kHz mono FLAC and, for datasets with video, sample frames
    at the configured rate into one .npz per clip; clips that fail are rejected with a reason
    (in out_rejected, kept_rejected and the log); when none is left the stage fails. Clips that
    are texts alone (`sources.text_only`) pass on unchanged: there is nothing to decode."""
    from affectlens.data.decode import decode_manifest
    from affectlens.data.manifest import read_manifest, write_manifest
    from affectlens.data.sources import VIDEO_SOURCES, text_only
    from affectlens.data.video import decode_frames

    m = read_manifest(manifest_path)
    source, rejected = dataset_cfg["source"], []
    Path(out_audio).mkdir(parents=True, exist_ok=True)
    Path(out_frames).mkdir(parents=True, exist_ok=True)
    if text_only(dataset, dataset_cfg):
        record_rejections([], out_rejected, kept_rejected)
        write_manifest(m, out_manifest)
        log.info("%d clips are texts alone: nothing to decode", len(m))
        return
    if source in VIDEO_SOURCES or source == "meld":
        m, bad = decode_frames(m, out_frames, n_jobs=threads, **dataset_cfg["video"])
        rejected += bad
    if source not in VIDEO_SOURCES:  # video QA clips need not carry audio
        m, bad = decode_manifest(m, out_audio, min_duration=dataset_cfg.get("min_duration", 0.2),
                                 max_duration=dataset_cfg.get("max_duration", 30.0), n_jobs=threads,
                                 over_range_mode=dataset_cfg.get("over_range", "normalise"))
        rejected += bad
    record_rejections(rejected, out_rejected, kept_rejected)
    if m.empty:
        raise ValueError(f"{manifest_path}: none of its clips decodes; the reasons are in "
                         f"{kept_rejected or out_rejected} and the log")
    write_manifest(m, out_manifest)
    log.info("decoded %d clips, rejected %d", len(m), len(rejected))


# --- dynamic ratings (PMEmo, DEAM) ---------------------------------------------------------------
DYNAMIC_SOURCES = ("pmemo", "deam")  # sources that publish 2 Hz valence/arousal curves


def dynamic_ratings(raw_dir, manifest_path, dataset: str, dataset_cfg: dict, out_ratings) -> None:
    """The 2 Hz valence/arousal ratings of the manifest's clips as one tidy table beside the
    manifest: clip_id, song, time_s (from the clip's start; segments re-based), valence, arousal,
    scale (the dataset's own)."""
    from affectlens.data.manifest import read_manifest
    from affectlens.data.sources import module

    source = dataset_cfg["source"]
    if source not in DYNAMIC_SOURCES:
        raise ValueError(f"dataset {dataset!r} (source {source}) has no dynamic ratings; only {DYNAMIC_SOURCES} do")
    table, missing = module(source).read_ratings(raw_dir, read_manifest(manifest_path))
    if missing:
        log.warning("%s: %d clips have no dynamic rating, e.g. %s", dataset, len(missing), missing[:5])
    if table.empty:
        raise ValueError(f"dataset {dataset!r}: none of the clips of {manifest_path} has a dynamic rating in {raw_dir}")
    write_tsv(table, out_ratings)
    log.info("%s: %d ratings of %d clips (%s scale)", dataset, len(table), table["clip_id"].nunique(),
             table["scale"].iloc[0])
