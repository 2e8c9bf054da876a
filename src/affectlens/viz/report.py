"""Pages and tables made for the Snakemake report (`snakemake --report`): a listening page per
steering run (every steered clip playable next to its original, with the judges' numbers) and a
summary of the heavy jobs' benchmark files."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from affectlens.io import atomic_path, write_text  # noqa: E402

AUDIO_MIME = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg"}
NUMBERS = [("p_target_model_probe", "P(target), model probe"), ("p_target_acoustic", "P(target), acoustic judge"),
           ("f0_mean_hz", "mean F0 (Hz)"), ("active_rms_db", "level (dB)"),
           ("wer_vs_original", "WER vs original"), ("speaker_similarity", "speaker similarity")]


def audio_tag(path: str | Path) -> str:
    """An <audio> player with the file embedded as a data URI (the page is self-contained)."""
    path = Path(path)
    mime = AUDIO_MIME.get(path.suffix.lower(), "application/octet-stream")
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<audio controls preload="none" src="data:{mime};base64,{data}"></audio>'


def write_tsv(df: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False)


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "–" if np.isnan(v) else f"{v:.3g}"
    return html.escape(str(v))


def steer_listen_page(steer_dir, decode_manifest, out_html, title: str | None = None) -> int:
    """Write out_html: per steered clip, the original (decoded) audio and the steered audio of
    every alpha, each with the judges' numbers from evaluation.tsv; the run's summary.tsv on top.
    Returns the number of players on the page."""
    steer_dir = Path(steer_dir)
    ev = pd.read_csv(steer_dir / "evaluation.tsv", sep="\t", dtype={"output": str})
    summary = pd.read_csv(steer_dir / "summary.tsv", sep="\t", dtype={"output": str})
    manifest = pd.read_csv(decode_manifest, sep="\t", dtype={"clip_id": str}).set_index("clip_id")
    title = title or f"Steered audio: {steer_dir}"
    cols = [c for c, _ in NUMBERS if c in ev]
    head = "".join(f"<th>{html.escape(dict(NUMBERS)[c])}</th>" for c in cols)
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<p>Every steered file carries the label &ldquo;Edited for research &mdash; emotion changed&rdquo; "
             "and a watermark (<code>affectlens watermark check FILE</code>).</p>",
             "<h2>Summary over clips</h2>", "<table><tr>"
             + "".join(f"<th>{html.escape(c)}</th>" for c in summary.columns) + "</tr>"]
    for r in summary.itertuples(index=False):
        parts.append("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>")
    versus = steer_dir / "controls.tsv"
    if versus.exists():
        c = pd.read_csv(versus, sep="\t")
        c = c[c.control == "best_control"]
        parts.append("</table><h2>Methods against the best control (paired over clips, 95 % interval)</h2><table><tr>"
                     + "".join(f"<th>{html.escape(k)}</th>" for k in c.columns) + "</tr>")
        for r in c.itertuples(index=False):
            parts.append("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>")
    parts.append("</table><h2>Clips</h2>")
    n_players = 0
    for clip_id, g in ev.groupby("clip_id", sort=False):
        spk = g["speaker"].iloc[0] if "speaker" in g else ""
        ref = g["reference"].iloc[0] if "reference" in g else ""
        parts.append(f"<h3>{html.escape(str(clip_id))} (speaker {html.escape(str(spk))})</h3>"
                     f"<p class='ref'>transcript of the original: {html.escape(str(ref))}</p>")
        parts.append(f"<table><tr><th>output</th><th>audio</th>{head}<th>transcript</th></tr>")
        g = g[(g.output != "0") | ~g.duplicated("output")]  # alpha 0 is one file, shared by every method
        for r in g.to_dict("records"):
            if r["output"] == "original":
                path = Path(str(manifest.loc[str(clip_id), "path"]))
            else:  # the file the stage wrote for this row (alpha 0 is one file shared by every method)
                path = steer_dir / "audio" / str(r["file"])
            player = audio_tag(path) if path.exists() else f"<em>missing: {html.escape(str(path))}</em>"
            n_players += path.exists()
            seed = "" if pd.isna(r.get("seed", np.nan)) else f" seed {int(r['seed'])}"
            label = ("original" if r["output"] == "original"
                     else f"{r.get('kind', '')} {r.get('method', '')}{seed} α = {float(r['alpha']):g}")
            parts.append(f"<tr><td>{label}</td><td>{player}</td>"
                         + "".join(f"<td>{_fmt(r[c])}</td>" for c in cols)
                         + f"<td>{html.escape(str(r.get('transcript', '')))}</td></tr>")
        parts.append("</table>")
    style = ("body{font-family:sans-serif;margin:1em} table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px} audio{height:30px;width:240px}"
             ".ref{color:#555;font-size:13px}")
    write_text(out_html, f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                         f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
    return n_players


def read_benchmarks(paths, root: str = "benchmarks") -> pd.DataFrame:
    """Snakemake benchmark files (benchmarks/{rule}/{job}.tsv) as one table: rule, job, and the
    wall time (s), CPU time (s), peak resident memory (MB) and mean load Snakemake measured."""
    rows = []
    for p in paths:
        p = Path(p)
        parts = p.with_suffix("").parts
        i = parts.index(root) if root in parts else len(parts) - 2
        rule, job = parts[i + 1], "/".join(parts[i + 2:])
        b = pd.read_csv(p, sep="\t")
        for attempt, r in enumerate(b.to_dict("records"), 1):
            rows.append({"rule": rule, "job": job, "repeat": attempt, "wall_s": float(r["s"]),
                         "cpu_s": float(r.get("cpu_time", np.nan)), "max_rss_mb": float(r.get("max_rss", np.nan)),
                         "mean_load": float(r.get("mean_load", np.nan))})
    return pd.DataFrame(rows, columns=["rule", "job", "repeat", "wall_s", "cpu_s", "max_rss_mb", "mean_load"])


def benchmark_summary(paths, out_tsv, out_png) -> pd.DataFrame:
    """Write the table of read_benchmarks and a bar chart of wall time and peak memory per job."""
    table = read_benchmarks(paths).sort_values(["rule", "job", "repeat"]).reset_index(drop=True)
    write_tsv(table, out_tsv)
    names = [f"{r}: {j}" for r, j in zip(table["rule"], table["job"])]
    height = max(2.5, 0.35 * len(table) + 1.2)
    fig, axes = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    y = np.arange(len(table))
    axes[0].barh(y, table["wall_s"], color="tab:blue", label="wall")
    axes[0].barh(y, table["cpu_s"].fillna(0), color="tab:orange", alpha=0.5, height=0.4, label="CPU")
    axes[0].set_xlabel("seconds")
    axes[0].legend(loc="lower right", fontsize=8)
    axes[1].barh(y, table["max_rss_mb"].fillna(0), color="tab:green")
    axes[1].set_xlabel("peak resident memory (MB)")
    axes[0].set_yticks(y, names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("Heavy jobs: Snakemake benchmark files")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return table
