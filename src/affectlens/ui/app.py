"""The Dash page over an indexed results folder (`affectlens ui RESULTS_DIR`)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from affectlens.ui.files import mime_type, resolve_inside
from affectlens.ui.index import NO_STUDY, index_results

FILES = "/files/"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# how a heatmap's kind reads in its caption (the site × time window map needs no words)
MAP_LABELS = {"heads": "heads, block × head, ", "head_windows": "heads, head × time window, "}
# evaluation.tsv columns shown, in this order (others that exist are left out of the table, not the file)
EVAL_COLUMNS = ["output", "alpha", "p_target_model_probe", "p_target_acoustic", "f0_mean_hz", "f0_range_st",
                "active_rms_db", "wer_vs_original", "speaker_similarity", "transcript"]


def file_url(rel: str | None) -> str | None:
    return None if rel is None else FILES + quote(rel)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.3g}"
    return str(v)


def table(df: pd.DataFrame, table_id: str, highlight: dict | None = None):
    """An HTML table of df; rows where column == value for (column, value) in highlight are marked."""
    from dash import html

    col, val = next(iter(highlight.items())) if highlight else (None, None)
    head = html.Tr([html.Th(c) for c in df.columns])
    rows = [html.Tr([html.Td(_fmt(v)) for v in r], className="current" if col and str(r[df.columns.get_loc(col)]) == val
                    else None) for r in df.itertuples(index=False)]
    return html.Div(html.Table([html.Thead(head), html.Tbody(rows)], id=table_id, className="numbers"),
                    className="scroll")


def _read_tsv(root: Path, rel: str | None) -> pd.DataFrame | None:
    if rel is None:
        return None
    path = resolve_inside(root, rel)
    return None if path is None else pd.read_csv(path, sep="\t", dtype={"output": str})


def concept_list(concepts: list[dict]):
    """One line per concept folder: its name and links to the dashboard, figure and tables."""
    from dash import html

    if not concepts:
        return [html.P("No concepts (config `concepts:`, or `affectlens concept`).", className="note")]
    links = [("dashboard", "dashboard"), ("figure", "features.png"), ("features", "features.tsv"),
             ("probe", "probe.tsv"), ("summary", "summary.json")]
    return [html.Ul([html.Li([html.Code(c["name"]), ": ",
                              *[part for key, text in links if c[key]
                                for part in (html.A(text, href=file_url(c[key]), target="_blank"), " · ")][:-1]])
                     for c in concepts])]


def transfer_section(entries: list[dict]):
    """A study's transfer results: per model, its figures and links to its tables."""
    from dash import html

    if not entries:
        return [html.P("No transfer results for this study (studies with two or more datasets).", className="note")]
    out = []
    for e in entries:
        links = [html.A("numbers (transfer.tsv)", href=file_url(e["table"]))]
        if e["axes"]:
            links += [" · ", html.A("axes.tsv", href=file_url(e["axes"]))]
        out += [html.H3(e["model"]), html.Div(links),
                html.Div([html.Figure([html.Img(src=file_url(f["path"]), className="figure transfer", alt=f["name"]),
                                       html.Figcaption(f["name"].replace("_", " "))]) for f in e["figures"]],
                         className="grid")]
    return out


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; border-bottom: 1px solid #ccc; margin-top: 1.6em; }
.pickers { display: flex; gap: 1.5em; flex-wrap: wrap; } .pickers > div { min-width: 16em; }
img.figure { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; } .grid > figure { width: 47%; margin: 0; }
.scroll { overflow-x: auto; max-width: 100%; }
table.numbers { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
table.numbers td, table.numbers th { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
table.numbers tr.current { background: #fff3c4; }
.audio-pair { display: flex; gap: 2em; flex-wrap: wrap; align-items: center; }
.slider { max-width: 30em; margin: 0.8em 0 1.5em; } .note { color: #666; font-size: 0.85em; }
"""


def create_app(root: str | Path):
    """A Dash app showing `root` (a finished `results/` folder); files are served from inside it only."""
    try:
        from dash import Dash, Input, Output, State, dcc, html
        from flask import abort, request, send_file
    except ImportError as e:  # the optional extra
        raise RuntimeError(f"the web UI needs Dash: pip install 'affectlens[ui]' ({e})") from e

    root = Path(root).resolve()
    index = index_results(root)
    runs, studies = index["runs"], index["studies"]
    if not runs and not index["transfer"]:
        raise ValueError(f"{root} holds no probe, patch, heatmap, SAE, steering or transfer results")

    app = Dash(__name__, title="affectlens results", serve_locally=True)
    app.index_string = app.index_string.replace("{%css%}", "{%css%}<style>" + CSS + "</style>")

    file_rule = FILES + "<path:relpath>"

    @app.server.before_request
    def only_files_route_under_files():  # else Dash's catch-all page answers /files//etc/passwd with 200
        if (request.path + "/").startswith(FILES) and getattr(request.url_rule, "rule", None) != file_rule:
            abort(404)

    @app.server.route(file_rule)
    def serve_file(relpath):
        path = resolve_inside(root, relpath)
        if path is None:
            abort(404)
        response = send_file(path, mimetype=mime_type(path), conditional=True)  # ranges: audio can seek
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    first_study = next(iter(studies))
    heatmap_link = ([" · ", html.A("all heatmaps (index.html)", href=file_url(index["heatmap_index"]),
                                   target="_blank")] if index["heatmap_index"] else [])
    app.layout = html.Div([
        html.H1("affectlens results"),
        html.Div([html.Code(str(root))] + heatmap_link, className="note"),
        html.Div([
            html.Div([html.Label("Study", htmlFor="study"),
                      dcc.Dropdown(id="study", options=list(studies), value=first_study, clearable=False)]),
            html.Div([html.Label("Dataset × model", htmlFor="run"), dcc.Dropdown(id="run", clearable=False)]),
        ], className="pickers"),
        html.H2("Activation-patching heatmaps"), html.Div(id="heatmaps"),
        html.H2("Probes"), html.Div(id="probes"),
        html.H2("Transfer across corpora"), html.Div(id="transfer"),
        html.H2("Sparse autoencoders"), html.Div(id="sae"),
        html.H2("Concepts from folders"), html.Div(concept_list(index["concepts"]), id="concepts"),
        html.H2("Steering"),
        html.Div([
            html.Div([html.Label("Contrast", htmlFor="contrast"), dcc.Dropdown(id="contrast", clearable=False)]),
            html.Div([html.Label("Clip", htmlFor="clip"), dcc.Dropdown(id="clip", clearable=False)]),
        ], className="pickers"),
        html.Div([html.Label(["α (strength, over the pre-rendered grid): ", html.B(id="alpha-label")]),
                  dcc.Slider(id="alpha", min=0, max=1, step=1, value=0, marks={0: "0"},
                             allow_direct_input=False)], className="slider"),
        html.Div([
            html.Div([html.Div("original"), html.Audio(id="audio-original", controls=True, preload="metadata")]),
            html.Div([html.Div(id="steered-caption"),
                      html.Audio(id="audio-steered", controls=True, preload="metadata")]),
        ], className="audio-pair"),
        html.P("Steered files are labelled “Edited for research — emotion changed” and watermarked.",
               className="note"),
        html.H3("This clip: evaluation per output"), html.Div(id="evaluation"),
        html.H3("Mean over clips (summary.tsv)"), html.Div(id="summary"),
        html.Div(id="dose-response"),
    ])

    @app.callback(Output("run", "options"), Output("run", "value"), Input("study", "value"))
    def pick_study(study):
        keys = studies.get(study, [])
        return [{"label": k.replace("/", " × "), "value": k} for k in keys], (keys[0] if keys else None)

    @app.callback(Output("transfer", "children"), Input("study", "value"))
    def pick_transfer(study):
        return transfer_section(index["transfer"].get(study, []))

    @app.callback(Output("heatmaps", "children"), Output("probes", "children"), Output("sae", "children"),
                  Output("contrast", "options"), Output("contrast", "value"),
                  Input("run", "value"), State("study", "value"))
    def pick_run(key, study):
        run = runs.get(key)
        if run is None:
            return [], [], [], [], None
        maps = [h for h in run["heatmaps"] if study == NO_STUDY or h["study"] == study]
        heatmaps = [html.Figure([html.Img(src=file_url(h["png"]), className="figure heatmap",
                                          alt=f"{h['contrast']} {h['method']}"),
                                 html.Figcaption([f"{h['contrast'].replace('-to-', ' → ')}, "
                                                  f"{MAP_LABELS.get(h.get('map'), '')}{h['method']} patching",
                                                  *([" — ", html.A("numbers (TSV)", href=file_url(h["tsv"]))]
                                                    if h["tsv"] else [])])]) for h in maps]
        heatmaps = heatmaps or [html.P("No heatmaps for this run.", className="note")]
        probe = run["probe"]
        probes = ([html.A("numbers (sweep.tsv)", href=file_url(probe["sweep"])),
                   html.Div([html.Figure([html.Img(src=file_url(f["path"]), className="figure probe", alt=f["name"]),
                                          html.Figcaption(f["name"].replace("_", " "))])
                             for f in probe["figures"]], className="grid")]
                  if probe else [html.P("No probe results for this run.", className="note")])
        sae = ([html.Ul([html.Li([html.Code(s["site"]), ": ",
                                  html.A("dashboard", href=file_url(s["dashboard"]), target="_blank")
                                  if s["dashboard"] else "no dashboard",
                                  *([" · ", html.A("metrics.json", href=file_url(s["metrics"]))]
                                    if s["metrics"] else [])]) for s in run["sae"]])]
               if run["sae"] else [html.P("No SAE for this run.", className="note")])
        contrasts = list(run["steer"])
        return heatmaps, probes, sae, contrasts, (contrasts[0] if contrasts else None)

    @app.callback(Output("clip", "options"), Output("clip", "value"), Output("alpha", "max"),
                  Output("alpha", "marks"), Output("alpha", "value"), Output("summary", "children"),
                  Output("dose-response", "children"), Input("contrast", "value"), State("run", "value"))
    def pick_contrast(contrast, key):
        steer = runs.get(key, {}).get("steer", {}).get(contrast)
        if steer is None:
            return [], None, 1, {0: "–"}, 0, html.P("No steering for this run.", className="note"), []
        clips = list(steer["clips"])
        marks = {i: a for i, a in enumerate(steer["alphas"])}
        summary = _read_tsv(root, steer["summary"])
        dose = ([html.Img(src=file_url(steer["dose_response"]), className="figure dose", alt="dose response")]
                if steer["dose_response"] else [])
        return (clips, (clips[0] if clips else None), max(len(marks) - 1, 1), marks or {0: "–"}, 0,
                table(summary, "summary-table") if summary is not None else [], dose)

    @app.callback(Output("audio-original", "src"), Output("audio-steered", "src"), Output("alpha-label", "children"),
                  Output("steered-caption", "children"), Output("evaluation", "children"),
                  Input("clip", "value"), Input("alpha", "value"), State("contrast", "value"), State("run", "value"))
    def pick_clip_alpha(clip, i, contrast, key):
        steer = runs.get(key, {}).get("steer", {}).get(contrast)
        if steer is None or clip not in steer["clips"] or not steer["alphas"]:
            return None, None, "–", "steered", []
        alpha = steer["alphas"][min(max(round(i or 0), 0), len(steer["alphas"]) - 1)]
        ev = _read_tsv(root, steer["evaluation"])
        rows = []
        if ev is not None and "clip_id" in ev:
            ev = ev[ev["clip_id"].astype(str) == clip]
            if "method" in ev:  # the slider's audio is the difference of means (other methods: the report)
                ev = ev[ev["method"].isin(["none", "diff_of_means"])]
            rows = table(ev[[c for c in EVAL_COLUMNS if c in ev]], "evaluation-table", {"output": alpha})
        return (file_url(steer["originals"].get(clip)), file_url(steer["clips"][clip].get(alpha)), alpha,
                f"steered, α = {alpha}", rows)

    return app


def serve(root: str | Path, host: str = "127.0.0.1", port: int = 8050) -> None:
    """Serve the UI until interrupted. Binds to the loopback interface unless told otherwise."""
    app = create_app(root)
    if host not in LOOPBACK:
        print(f"affectlens ui: warning: listening on {host}, so other machines can read {Path(root).resolve()}",
              file=sys.stderr)
    print(f"affectlens ui: http://{'[' + host + ']' if ':' in host else host}:{port}/  (Ctrl-C stops)")
    app.run(host=host, port=port, debug=False)
