"""Index a finished results folder (the workflow's `results/`) into what the UI shows.

Pure: reads file names (and nothing but the names) under the folder, returns plain dicts and lists
of paths relative to the folder (POSIX), so that the page only ever names files inside it.

Layout read (see workflow/rules/*.smk):
  probe/{dataset}/{model}/sweep.tsv, *.png           probe tables and curves
  probe_dynamic/{dataset}/{model}/dynamic.png        valence/arousal curves (PMEmo, DEAM), with the probe's
  patch/{dataset}/{model}/{contrast}/summary.tsv     activation patching
  heatmaps/{study}/{dataset}__{model}__{contrast}[__{kind}][__{method}].png (+ .tsv), heatmaps/index.html
                                                     (naming.heatmap_stem: site maps, head-level maps)
  sae/{dataset}/{model}/{site}/dashboard.html, metrics.json
  steer/{dataset}/{model}/{contrast}/audio/{clip}__alpha{a}.wav, evaluation.tsv, summary.tsv,
                                   dose_response.png
  decode/{dataset}/audio/{clip}.flac                 the original clips
  concepts/{concept}/dashboard.html, features.png, features.tsv, probe.tsv, summary.json
                                                     concepts from folders (not tied to a run)
  transfer/{study}/{model}/transfer.tsv, axes.tsv, *.png
                                                     probes and axes across a study's datasets
"""

from __future__ import annotations

import re
from pathlib import Path

from affectlens.naming import PRIMARY_METHOD, parse_heatmap_stem, parse_steered_wav_name

NO_STUDY = "(no study)"
_CONTRAST = re.compile(r"^[A-Za-z0-9_]+-to-[A-Za-z0-9_]+$")
PROBE_FIGURES = ["layer_curve", "time_curve", "confusion", "projection"]  # shown in this order, others after
AUDIO_SUFFIXES = (".flac", ".wav", ".mp3", ".ogg")


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []


def alpha_grid(audio_dir: Path) -> tuple[list[str], dict[str, dict[str, Path]]]:
    """(α labels sorted by value, {clip: {α label: wav}}) of a steer folder's audio/, for the
    difference-of-means method (the page's slider; the other methods' files are in the report). The
    labels are spelled as in the file names (`f"{alpha:g}"`), so they round-trip to the files."""
    clips: dict[str, dict[str, Path]] = {}
    for wav in sorted(audio_dir.glob("*.wav")) if audio_dir.is_dir() else []:
        m = parse_steered_wav_name(wav.name)
        if m and m.method == PRIMARY_METHOD:
            clips.setdefault(m.clip, {})[m.alpha] = wav
    labels = sorted({a for per in clips.values() for a in per}, key=float)
    return labels, clips


def _run(runs: dict, dataset: str, model: str) -> dict:
    key = f"{dataset}/{model}"
    return runs.setdefault(key, {"key": key, "dataset": dataset, "model": model, "probe": None, "heatmaps": [],
                                 "patch": {}, "sae": [], "steer": {}})


def _original(root: Path, dataset: str, clip: str) -> str | None:
    for suffix in AUDIO_SUFFIXES:
        p = root / "decode" / dataset / "audio" / f"{clip}{suffix}"
        if p.is_file():
            return _rel(p, root)
    return None


def _steer(root: Path, folder: Path, dataset: str) -> dict:
    labels, clips = alpha_grid(folder / "audio")
    maybe = {name: folder / f"{name}.{ext}" for name, ext in
             [("evaluation", "tsv"), ("summary", "tsv"), ("dose_response", "png"), ("inversion_quality", "tsv")]}
    out = {name: (_rel(p, root) if p.is_file() else None) for name, p in maybe.items()}
    out["contrast"] = folder.name
    out["alphas"] = labels
    out["clips"] = {c: {a: _rel(p, root) for a, p in per.items()} for c, per in clips.items()}
    out["originals"] = {c: _original(root, dataset, c) for c in clips}
    return out


def index_results(root: str | Path) -> dict:
    """{"root", "studies": {study: [run key, ...]}, "runs": {"dataset/model": {...}}, "concepts",
    "heatmap_index"}.

    A run holds `probe` ({"sweep", "figures": [{"name", "path"}]} or None), `heatmaps` ([{"study",
    "contrast", "map" ("sites", "heads", "head_windows"), "method", "png", "tsv"}]), `patch` ({contrast: summary.tsv}), `sae` ([{"site",
    "dashboard", "metrics"}]) and `steer` ({contrast: {"alphas": [labels sorted by value], "clips":
    {clip: {α: wav}}, "originals": {clip: flac or None}, "evaluation", "summary", "dose_response"}}).
    Studies come from heatmaps/{study}/; runs in no study are listed under NO_STUDY. `concepts` lists
    the finished concept folders: [{"name", "dashboard", "figure", "features", "probe", "summary"}]; `transfer`
    the transfer results by study: {study: [{"model", "table", "axes", "figures": [{"name", "path"}]}]} (a
    study with transfer results is listed in `studies`, with the runs its heatmaps name, if any)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"no results folder {root}")
    runs: dict[str, dict] = {}
    studies: dict[str, list[str]] = {}

    for d in _subdirs(root / "probe"):
        for m in _subdirs(d):
            if not (m / "sweep.tsv").is_file():
                continue
            dynamic = root / "probe_dynamic" / d.name / m.name  # PMEmo / DEAM: the valence/arousal curves
            pngs = sorted([*m.glob("*.png"), *dynamic.glob("*.png")],
                          key=lambda p: (PROBE_FIGURES.index(p.stem) if p.stem in PROBE_FIGURES
                                         else len(PROBE_FIGURES), p.name))
            _run(runs, d.name, m.name)["probe"] = {
                "sweep": _rel(m / "sweep.tsv", root),
                "figures": [{"name": p.stem, "path": _rel(p, root)} for p in pngs]}

    for d in _subdirs(root / "patch"):
        for m in _subdirs(d):
            for c in _subdirs(m):
                if _CONTRAST.match(c.name) and (c / "summary.tsv").is_file():
                    _run(runs, d.name, m.name)["patch"][c.name] = _rel(c / "summary.tsv", root)

    for study in _subdirs(root / "heatmaps"):
        for png in sorted(study.glob("*.png")):
            name = parse_heatmap_stem(png.stem)
            if name is None or not _CONTRAST.match(name.contrast):
                continue
            run = _run(runs, name.dataset, name.model)
            tsv = png.with_suffix(".tsv")
            run["heatmaps"].append({"study": study.name, "contrast": name.contrast, "map": name.kind,
                                    "method": name.method, "png": _rel(png, root),
                                    "tsv": _rel(tsv, root) if tsv.is_file() else None})
            keys = studies.setdefault(study.name, [])
            if run["key"] not in keys:
                keys.append(run["key"])

    for d in _subdirs(root / "sae"):
        for m in _subdirs(d):
            for site in _subdirs(m):
                dash = site / "dashboard.html"
                metrics = site / "metrics.json"
                if dash.is_file() or metrics.is_file():
                    _run(runs, d.name, m.name)["sae"].append({
                        "site": site.name, "dashboard": _rel(dash, root) if dash.is_file() else None,
                        "metrics": _rel(metrics, root) if metrics.is_file() else None})

    for d in _subdirs(root / "steer"):
        for m in _subdirs(d):
            for c in _subdirs(m):
                if _CONTRAST.match(c.name):
                    _run(runs, d.name, m.name)["steer"][c.name] = _steer(root, c, d.name)

    concepts = []
    for c in _subdirs(root / "concepts"):
        files = {name: c / f"{name}.{ext}" for name, ext in
                 [("dashboard", "html"), ("figure", "png"), ("features", "tsv"), ("probe", "tsv"), ("summary", "json")]}
        if files["summary"].is_file():  # written last: the folder is complete
            concepts.append({"name": c.name, **{k: _rel(p, root) if p.is_file() else None for k, p in files.items()}})

    transfer: dict[str, list[dict]] = {}
    for study in _subdirs(root / "transfer"):
        for m in _subdirs(study):
            if (m / "transfer.tsv").is_file():
                axes = m / "axes.tsv"
                transfer.setdefault(study.name, []).append({
                    "model": m.name, "table": _rel(m / "transfer.tsv", root),
                    "axes": _rel(axes, root) if axes.is_file() else None,
                    "figures": [{"name": p.stem, "path": _rel(p, root)} for p in sorted(m.glob("*.png"))]})
        if study.name in transfer:
            studies.setdefault(study.name, [])

    runs = dict(sorted(runs.items()))
    loose = [k for k in runs if not any(k in keys for keys in studies.values())]
    if loose:
        studies[NO_STUDY] = loose
    index_html = root / "heatmaps" / "index.html"
    return {"root": str(root), "studies": studies, "runs": runs, "concepts": concepts, "transfer": transfer,
            "heatmap_index": _rel(index_html, root) if index_html.is_file() else None}
