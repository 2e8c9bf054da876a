"""Causal tracing of video question answering: which frames and which layers carry the answer.

One question = a video, a question and its candidate answers. The model's answer is the
candidate it scores highest. A counterfactual video (frame spans swapped, reversed, motion
removed, frames replaced by their mean) is the corrupt run; the metric is the logit difference
between the original answer and the counterfactual run's answer at the answer position. Then
every LM site x token slice is patched in both directions -- denoising (counterfactual run,
clean activations written in) and noising (clean run, counterfactual activations written in) --
and reported raw and normalised (counterfactual run = 0, clean run = 1).

Candidate scoring: the candidates are listed in the prompt as lettered options ("A. ...") and a
candidate's score is the logit of its letter at the answer position (the last prompt token). One
token per candidate keeps the metric linear in the logits, which patching's normalisation
assumes, and letters never share a first token, as free-text answers can ("a red car", "a blue
car"). `answer_style="text"` scores the first token of the candidate's own text instead and
refuses candidates whose first tokens collide.

When the counterfactual leaves the answer unchanged, the alternative is the counterfactual run's
best other candidate, so the metric stays "answer minus its strongest rival". The clean metric is
never negative (the answer is the clean run's best candidate); a negative counterfactual metric
means the counterfactual changed the answer, and a patch that turns it positive again restores
it -- what the probes on patching outcomes (affectlens.probes.outcomes) call a flip, read off the
per-question table and `trace_pairs`.

Spellings:
    counterfactuals   swap:a:b,c:d   frames [a, b) and [c, d) trade places (equal lengths)
                      reverse        the frames in reverse order (reverse:a:b reverses a span)
                      static         motion removed: every frame is frame 0 (static:k: frame k)
                      mean           every frame is the mean frame (mean:a:b: that span only)
    token slices      visual         every video token of the prompt
                      text           every other token (special tokens included)
                      visual_frames:a:b   the video tokens of sampled frames [a, b); a and b must
                                     be multiples of the model's temporal patch (2 for Qwen-VL),
                                     since one token covers that many frames
Frame indices are those of the sampled frames (the decode stage's `frames` array, with `times`).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from affectlens.models.base import Adapter, Batch
from affectlens.models.positions import Positions
from affectlens.models.sites import parse_site
from affectlens.patching.patch import MIN_METRIC_GAP

LETTERS = string.ascii_uppercase
TRACE_COLUMNS = ["pair_id", "question_id", "video", "counterfactual", "site", "depth", "slice", "direction", "n_positions",
                 "answer", "alternative", "gold", "raw", "clean", "corrupt", "normalised"]


# --- counterfactual videos ----------------------------------------------------------------------
def _span(text: str, n: int, where: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+):(\d+)", text.strip())
    if m is None:
        raise ValueError(f"{where}: span {text!r} is not 'start:end' (sampled frames, end exclusive)")
    a, b = int(m[1]), int(m[2])
    if not 0 <= a < b <= n:
        raise ValueError(f"{where}: span {a}:{b} is not within the video's {n} frames (0 <= start < end <= {n})")
    return a, b


def swap_spans(frames: np.ndarray, first: tuple[int, int], second: tuple[int, int]) -> np.ndarray:
    """Frames [a, b) and [c, d) trade places (equal lengths, not overlapping)."""
    (a, b), (c, d) = sorted([first, second])
    if b - a != d - c:
        raise ValueError(f"swap spans {a}:{b} and {c}:{d} differ in length; swap spans of equal length")
    if b > c:
        raise ValueError(f"swap spans {a}:{b} and {c}:{d} overlap")
    out = frames.copy()
    out[a:b], out[c:d] = frames[c:d], frames[a:b]
    return out


def reverse_frames(frames: np.ndarray, span: tuple[int, int] | None = None) -> np.ndarray:
    a, b = span or (0, len(frames))
    out = frames.copy()
    out[a:b] = frames[a:b][::-1]
    return out


def static_frames(frames: np.ndarray, index: int = 0) -> np.ndarray:
    """Motion removed: every frame replaced by frame `index`."""
    return np.repeat(frames[index:index + 1], len(frames), axis=0)


def mean_frames(frames: np.ndarray, span: tuple[int, int] | None = None) -> np.ndarray:
    """Frames [a, b) replaced by their pixel-wise mean (rounded, same dtype)."""
    a, b = span or (0, len(frames))
    out = frames.copy()
    mean = frames[a:b].astype(np.float64).mean(0)
    out[a:b] = np.round(mean).astype(frames.dtype) if np.issubdtype(frames.dtype, np.integer) else mean
    return out


def counterfactual_video(frames: np.ndarray, spec: str) -> np.ndarray:
    """The counterfactual `spec` (see the module docstring) of [frame, height, width, 3] frames."""
    frames = np.asarray(frames)
    n = len(frames)
    name, _, arg = spec.strip().partition(":")
    where = f"counterfactual {spec!r}"
    if name == "swap":
        parts = arg.split(",")
        if len(parts) != 2:
            raise ValueError(f"{where}: write swap:a:b,c:d (two frame spans)")
        return swap_spans(frames, _span(parts[0], n, where), _span(parts[1], n, where))
    if name == "reverse":
        return reverse_frames(frames, _span(arg, n, where) if arg else None)
    if name == "static":
        index = int(arg) if arg else 0
        if not 0 <= index < n:
            raise ValueError(f"{where}: frame {index} is not within the video's {n} frames")
        return static_frames(frames, index)
    if name == "mean":
        return mean_frames(frames, _span(arg, n, where) if arg else None)
    raise ValueError(f"{where}: unknown counterfactual {name!r}; choose swap:a:b,c:d, reverse[:a:b], "
                     f"static[:k] or mean[:a:b]")


# --- token slices -------------------------------------------------------------------------------
def slice_rows(positions: Positions, spec: str, temporal_patch: int) -> np.ndarray:
    """Rows of the padded LM sequence (Positions.index) that the token slice `spec` names."""
    if spec == "visual":
        return positions.index[positions.select("video")]
    if spec == "text":
        return positions.index[positions.select("text")]
    m = re.fullmatch(r"visual_frames:(\d+):(\d+)", spec)
    if m is None:
        raise ValueError(f"token slice {spec!r}: choose visual, text or visual_frames:a:b")
    a, b = int(m[1]), int(m[2])
    if a >= b or a % temporal_patch or b % temporal_patch:
        raise ValueError(f"token slice {spec!r}: a < b, both multiples of {temporal_patch} (one video token "
                         f"covers {temporal_patch} sampled frames)")
    n_tokens_frames = positions.frame[positions.select("video")]
    if not len(n_tokens_frames) or b // temporal_patch > n_tokens_frames.max() + 1:
        raise ValueError(f"token slice {spec!r}: the video has {(n_tokens_frames.max() + 1) * temporal_patch if len(n_tokens_frames) else 0} "
                         f"frames (after padding to a multiple of {temporal_patch})")
    return positions.index[positions.select("video", frames=(a // temporal_patch, b // temporal_patch - 1))]


def rows_setter(donor: torch.Tensor, rows: list[np.ndarray]):
    """Batch row i gets donor[r] written at the sequence rows rows[i] (donor: [token, d])."""

    def setter(activation: torch.Tensor, site: str) -> torch.Tensor:
        out = activation.clone()
        for i, r in enumerate(rows):
            r = torch.as_tensor(r, dtype=torch.long)
            out[i, r] = donor[r].to(out.dtype)
        return out

    return setter


# --- questions and the answer metric ------------------------------------------------------------
@dataclass
class Question:
    """One video question: sampled frames [frame, h, w, 3] with their times, the question, the
    candidate answers and, if annotated, the gold answer."""

    question_id: str
    video: str
    frames: np.ndarray
    times: np.ndarray
    question: str
    candidates: list[str]
    gold: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.candidates) < 2:
            raise ValueError(f"question {self.question_id}: needs at least two candidates, has {self.candidates!r}")
        if len(self.candidates) > len(LETTERS):
            raise ValueError(f"question {self.question_id}: more than {len(LETTERS)} candidates")


def question_prompt(q: Question) -> str:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(q.candidates))
    return f"{q.question}\n{options}\nAnswer with the option's letter."


def answer_token_ids(tokenizer, q: Question, answer_style: str = "letter") -> list[int]:
    """One token id per candidate: its letter, or the first token of its text."""
    if answer_style == "letter":
        texts = list(LETTERS[:len(q.candidates)])
    elif answer_style == "text":
        texts = list(q.candidates)
    else:
        raise ValueError(f"answer_style {answer_style!r}: choose letter or text")
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in texts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"question {q.question_id}: candidates {q.candidates!r} share a first token under "
                         f"answer_style={answer_style!r}; use answer_style='letter'")
    return ids


@dataclass
class AnswerLogitDiff:
    """Logit of `answer` minus logit of `alternative` at each row's last real token."""

    answer: int
    alternative: int

    def __call__(self, logits: torch.Tensor, last: list[int]) -> torch.Tensor:
        rows = logits[torch.arange(len(last)), torch.as_tensor(last)].float()
        return rows[:, self.answer] - rows[:, self.alternative]


def _last_rows(batch: Batch) -> list[int]:
    return [int(p.index[-1]) for p in batch.positions["decoder"]]


def _check_aligned(clean: Positions, corrupt: Positions, where: str) -> None:
    same = (len(clean) == len(corrupt) and np.array_equal(clean.index, corrupt.index)
            and np.array_equal(clean.kind, corrupt.kind) and np.array_equal(clean.frame, corrupt.frame))
    if not same:
        raise ValueError(f"{where}: the counterfactual prompt's tokens do not line up with the clean prompt's "
                         "(a counterfactual must keep the frame count and size)")


# --- tracing ------------------------------------------------------------------------------------
def trace_question(adapter: Adapter, q: Question, counterfactuals: list[str], sites: list[str],
                   slices: list[str], max_batch: int = 16, answer_style: str = "letter") -> pd.DataFrame:
    """Per counterfactual x direction x site x slice: the answer metric with that slice of that
    site patched from the other run. One row each (TRACE_COLUMNS); batched over slices."""
    for s in sites:
        if parse_site(s).tower != "decoder":
            raise ValueError(f"site {s!r}: video QA tracing patches LM sites (decoder.embed, decoder.blocks.L.point)")
    tokens = answer_token_ids(adapter.processor.tokenizer, q, answer_style)
    prompt = question_prompt(q)
    clean = adapter.prepare([{"video": {"frames": q.frames, "times": q.times}, "text": prompt}])
    clean_logits, clean_cache = adapter.run(clean, capture=sites)
    last = _last_rows(clean)
    scores = clean_logits[0, last[0], tokens].float()
    answer = int(scores.argmax())
    # Slices are checked (and their rows found) before any counterfactual runs.
    slice_rows_ = [slice_rows(clean.positions["decoder"][0], s, getattr(adapter, "temporal", 1)) for s in slices]
    rows = []
    for spec in counterfactuals:
        try:
            frames = counterfactual_video(q.frames, spec)
        except ValueError as e:
            raise ValueError(f"question {q.question_id} (video {q.video}, {len(q.frames)} frames): {e}") from e
        corrupt = adapter.prepare([{"video": {"frames": frames, "times": q.times}, "text": prompt}])
        _check_aligned(clean.positions["decoder"][0], corrupt.positions["decoder"][0],
                       f"question {q.question_id}, counterfactual {spec!r}")
        corrupt_logits, corrupt_cache = adapter.run(corrupt, capture=sites)
        cf_scores = corrupt_logits[0, last[0], tokens].float()
        ranked = [int(i) for i in torch.argsort(cf_scores, descending=True)]
        alternative = ranked[0] if ranked[0] != answer else ranked[1]
        metric = AnswerLogitDiff(tokens[answer], tokens[alternative])
        m_clean = float(metric(clean_logits, last)[0])
        m_corrupt = float(metric(corrupt_logits, last)[0])
        gap = m_clean - m_corrupt
        runs = (("denoising", corrupt, corrupt_cache, clean_cache), ("noising", clean, clean_cache, corrupt_cache))
        for direction, base, base_cache, donor_cache in runs:
            for site in sites:
                donor = donor_cache[site][0]
                for lo in range(0, len(slices), max_batch):
                    chunk = list(range(lo, min(lo + max_batch, len(slices))))
                    batch = base.repeat(len(chunk))  # run_from skips the vision tower at LM sites
                    start = base_cache[site].expand(len(chunk), -1, -1)
                    patched = rows_setter(donor, [slice_rows_[j] for j in chunk])(start, site)
                    logits, _ = adapter.run_from(batch, site, patched)
                    values = metric(logits, last * len(chunk)).tolist()
                    for j, raw in zip(chunk, values):
                        rows.append({
                            "pair_id": f"{q.question_id}:{spec}", "question_id": q.question_id, "video": q.video, "counterfactual": spec, "site": site,
                            "depth": parse_site(site).depth, "slice": slices[j], "direction": direction,
                            "n_positions": len(slice_rows_[j]), "answer": q.candidates[answer],
                            "alternative": q.candidates[alternative], "gold": q.gold, "raw": raw,
                            "clean": m_clean, "corrupt": m_corrupt,
                            "normalised": (raw - m_corrupt) / gap if abs(gap) >= MIN_METRIC_GAP else np.nan,
                        })
    return pd.DataFrame(rows, columns=TRACE_COLUMNS)


# --- questions from the workflow's manifest, and the summary over questions -----------------------
def questions_from_manifest(manifest: pd.DataFrame, n_questions: int | None = None, seed: int = 0,
                            where: str = "manifest") -> list[Question]:
    """The questions of a decoded video_qa manifest (candidates as JSON text, frames in each
    row's frames_path npz): those with candidates, at most `n_questions` drawn round-robin over
    videos with `seed` (None = all), in manifest order."""
    import json

    from affectlens.patching.pairs import draw_over_speakers

    for column in ("clip_id", "candidates", "frames_path"):
        if column not in manifest.columns:
            raise KeyError(f"{where} has no {column!r} column: tracing reads a video_qa manifest after frame "
                           "decoding (annotations with `candidates`, decode.video settings)")
    has = manifest[manifest["candidates"].notna() & manifest["frames_path"].notna()]
    if has.empty:
        raise ValueError(f"{where}: no question has both candidates and decoded frames; tracing scores the "
                         "candidates, so give the annotations a `candidates` list")
    chosen = draw_over_speakers(has, n_questions, seed) if "speaker" in has.columns else has.head(n_questions)
    chosen = has.loc[has.index.isin(chosen.index)]
    out = []
    for row in chosen.to_dict("records"):
        try:
            candidates = [str(c) for c in json.loads(row["candidates"])]
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: question {row['clip_id']}: candidates are not a JSON list ({e})") from e
        with np.load(row["frames_path"]) as z:
            frames, times = z["frames"], z["times"]
        gold = row.get("label")
        video = row.get("video_name") if isinstance(row.get("video_name"), str) else row.get("path", "")
        out.append(Question(str(row["clip_id"]), str(video), frames, times,
                            str(row["text"]), candidates, None if gold is None or pd.isna(gold) else str(gold)))
    return out


def trace_pairs(table: pd.DataFrame) -> pd.DataFrame:
    """One row per question x counterfactual in the layout of the patch stage's pairs table
    (pair_id, clean_clip, corrupt_clip: both the question's clip), so that the per-question table
    feeds the probes on patching outcomes (affectlens.probes.outcomes) as patch effects do."""
    cols = ["pair_id", "question_id", "video", "counterfactual", "answer", "alternative", "gold", "clean", "corrupt"]
    pairs = table[cols].drop_duplicates("pair_id").reset_index(drop=True)
    pairs.insert(1, "clean_clip", pairs["question_id"])
    pairs.insert(2, "corrupt_clip", pairs["question_id"])
    return pairs


def trace_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean normalised effect over questions per counterfactual x direction x site x slice, with
    the questions that could not be normalised (answer margin unchanged) counted, not averaged.
    Slices keep their configured order (`frame_start`) and name (`window`) for the heatmap."""
    order = {s: i for i, s in enumerate(dict.fromkeys(table["slice"]))}
    keys = ["counterfactual", "direction", "site", "depth", "slice"]
    g = table.groupby(keys, sort=False)
    summary = g.agg(n_questions=("normalised", "count"), mean=("normalised", "mean"), raw_mean=("raw", "mean"),
                    n_rows=("normalised", "size")).reset_index()
    summary["n_excluded"] = summary.pop("n_rows") - summary["n_questions"]
    summary["method"] = "exact"
    summary["frame_start"] = summary["slice"].map(order)
    summary["window"] = summary["slice"]
    return summary.sort_values(["counterfactual", "direction", "depth", "frame_start"]).reset_index(drop=True)
