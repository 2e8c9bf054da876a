"""File names the workflow writes and later reads back, each made and parsed here only.

- steered WAVs in results/steer/{dataset}/{model}/{contrast}/audio/:
  `{clip}__alpha{a}.wav` (difference of means, the vector the CLI reuses),
  `{clip}__m-{method}__alpha{a}.wav` (other methods and controls),
  `{clip}__m-{method}__s{seed}__alpha{a}.wav` (seeded controls: random directions);
- extraction shards: `i-of-n` (0-based shard i of n).
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
