"""File names the workflow writes and later reads back, each made and parsed here only.

- steered WAVs in results/steer/{dataset}/{model}/{contrast}/audio/:
  `{clip}__alpha{a}.wav` (difference of means, the vector the CLI reuses),
  `{clip}__m-{method}__alpha{a}.wav` (other methods and controls),
  `{clip}__m-{method}__s{seed}__alpha{a}.wav` (seeded controls: random directions);
- extraction shards: `i-of-n` (0-based shard i of n);
- patching heatmaps in results/heatmaps/{study}/: `{dataset}__{model}__{contrast}[__{kind}][__{method}]`
  (.png, .tsv), kind absent for the site × time window map, `heads` (block × head) or
  `head_windows` (head × time window) for head-level patching, method absent for exact patching.
"""

from __future__ import annotations

import re
from typing import NamedTuple

PRIMARY_METHOD = "diff_of_means"

_WAV = re.compile(r"^(?P<clip>.+?)(?:__m-(?P<method>[a-z_]+))?(?:__s(?P<seed>\d+))?"
                  r"__alpha(?P<alpha>[-+0-9.eE]+|nan|inf)\.wav$")
_SHARD = re.compile(r"^(?P<i>\d+)-of-(?P<n>\d+)$")


class SteeredWav(NamedTuple):
    clip: str
    method: str
    alpha: str  # as spelled in the name (f"{alpha:g}"), so it round-trips
    seed: int | None


def steered_wav_name(clip_id: str, method: str, alpha: float, seed: int | None = None) -> str:
    middle = "" if method == PRIMARY_METHOD else f"__m-{method}"
    if seed is not None:
        middle += f"__s{int(seed)}"
    return f"{clip_id}{middle}__alpha{alpha:g}.wav"


def parse_steered_wav_name(name: str) -> SteeredWav | None:
    """The parts of a steered WAV's file name; None for any other name."""
    m = _WAV.match(name)
    if m is None:
        return None
    return SteeredWav(m["clip"], m["method"] or PRIMARY_METHOD, m["alpha"],
                      None if m["seed"] is None else int(m["seed"]))


def shard_name(i: int, n: int) -> str:
    return f"{i}-of-{n}"


def parse_shard(text: str) -> tuple[int, int]:
    m = _SHARD.match(str(text))
    if m is None or not 0 <= int(m["i"]) < int(m["n"]):
        raise ValueError(f"shard {text!r} is not 'i-of-n' with 0 <= i < n")
    return int(m["i"]), int(m["n"])


HEAD_MAPS = ("heads", "head_windows")
"""Kinds of head-level heatmap: block × head (each head over the whole clip), head × time window."""


class HeatmapName(NamedTuple):
    dataset: str
    model: str
    contrast: str
    kind: str  # "sites" or one of HEAD_MAPS
    method: str  # "exact", "attribution", ...


def heatmap_stem(dataset: str, model: str, contrast: str, kind: str = "sites", method: str = "exact") -> str:
    parts = [dataset, model, contrast] + ([kind] if kind != "sites" else []) + ([method] if method != "exact" else [])
    return "__".join(parts)


def parse_heatmap_stem(stem: str) -> HeatmapName | None:
    """The parts of a heatmap's file stem; None for any other stem."""
    parts = stem.split("__")
    if len(parts) < 3:
        return None
    rest = parts[3:]
    kind = rest.pop(0) if rest and rest[0] in HEAD_MAPS else "sites"
    if len(rest) > 1:
        return None
    return HeatmapName(parts[0], parts[1], parts[2], kind, rest[0] if rest else "exact")
