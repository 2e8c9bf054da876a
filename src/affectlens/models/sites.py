"""The site grammar: one spelling for every place activations are read or written.

    {tower}.embed                 the input to block 0 (after the tower's input embedding)
    {tower}.blocks.{L}.{point}    point in resid_post | attn_out | mlp_out | attn_heads | mlp_hidden
    latent                        the latent sequence of an autoencoder (RAVE's z between encode
                                  and decode): a tower of its own, without blocks

Towers of speech-generating LMs: `talker` (Qwen-Omni's Talker LM, which writes codec codes) and
`predictor` (Qwen3-Omni's multi-codebook code predictor, which fills each codec frame's residual
codebooks after the Talker's first one).

`resid_pre` is not a spelling of its own: the input to block L is `{tower}.embed` for L = 0 and
`{tower}.blocks.{L-1}.resid_post` otherwise, and the parser says so rather than accepting a
second name for the same tensor.

Finer points inside a block (docs/sites.md):

    attn_heads    the attention's per-head outputs before the output projection (the input of
                  `out_proj` / `o_proj`): [frame, head * d_head], head-major (head h is columns
                  h * d_head ... (h + 1) * d_head - 1); the store records `n_heads` and `d_head`
                  per site. Projected by the output projection (plus its bias) it is attn_out.
    mlp_hidden    the feed-forward's hidden activation after the activation function (for gated
                  MLPs after the gate's product): the input of the second linear (`fc2` /
                  `down_proj`), whose output is mlp_out.

Within a block the points follow the forward's order, which is also their sort order:
attn_heads < attn_out < mlp_hidden < mlp_out < resid_post.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TOWERS = ("encoder", "decoder", "thinker", "talker", "predictor", "vision", "text", "audio", "latent")
POINTS = ("resid_post", "attn_out", "mlp_out", "attn_heads", "mlp_hidden")
BLOCK_INNER_POINTS = ("attn_heads", "attn_out", "mlp_hidden", "mlp_out")
"""Points inside a block (before its output): a run can resume at the block's input and reach them."""
GENERATED_TOWERS = ("talker", "predictor")
"""Towers a forward over the prompt never reaches: read while speech is generated (Qwen-Omni)."""

SITE_PATTERN = r"latent|[a-z]+\.(embed|blocks\.[0-9]+\.[a-z_]+)"
"""The shape of a site name as one regular expression: the workflow's `{site}` wildcard constraint
(common.smk) and the schema's `pattern` of every site key (tested equal). `parse_site` then checks
the tower and point names."""
SITE_OR_PATTERN = r"latent|[a-z]+\.(embed|blocks\.([0-9]+|\*)\.[a-z_]+)"
"""A site, or `*` in the block position (`models.*.sites`)."""

_SITE = re.compile(r"^(?P<tower>[a-z]+)\.(?:(?P<embed>embed)|blocks\.(?P<block>\d+)\.(?P<point>[a-z_]+))$")


class SiteError(ValueError):
    """A site string that does not follow the grammar, or names a place the model lacks."""


@dataclass(frozen=True, order=True)
class Site:
    tower: str
    block: int  # -1 for `embed`, so that sorting puts the embedding first
    point: str  # "embed" or one of POINTS

    def __str__(self) -> str:
        if self.point == "latent":
            return "latent"
        if self.point == "embed":
            return f"{self.tower}.embed"
        return f"{self.tower}.blocks.{self.block}.{self.point}"

    @property
    def depth(self) -> int:
        """Position along the tower: 0 for embed, L + 1 for block L."""
        return self.block + 1

    @property
    def block_input(self) -> "Site":
        """The site holding the input of this site's block: `{tower}.embed` for block 0, else the
        previous block's resid_post (what the grammar calls resid_pre)."""
        if self.block < 0:
            raise SiteError(f"site {self}: not inside a block")
        return Site(self.tower, -1, "embed") if self.block == 0 else Site(self.tower, self.block - 1, "resid_post")


def parse_site(text: str) -> Site:
    if text.strip() == "latent":
        return Site("latent", -1, "latent")
    m = _SITE.match(text.strip())
    if m is not None and m["point"] == "resid_pre":
        block = int(m["block"])
        hint = f"{m['tower']}.embed" if block == 0 else f"{m['tower']}.blocks.{block - 1}.resid_post"
        raise SiteError(f"site {text!r}: resid_pre is spelled {hint!r} (the same tensor)")
    if m is None:
        raise SiteError(
            f"site {text!r} does not follow '{{tower}}.embed' or '{{tower}}.blocks.{{L}}.{{point}}' "
            f"with point in {POINTS}"
        )
    tower = m["tower"]
    if tower not in TOWERS:
        raise SiteError(f"site {text!r}: unknown tower {tower!r}; towers are {TOWERS}")
    if m["embed"]:
        return Site(tower, -1, "embed")
    point = m["point"]
    if point not in POINTS:
        raise SiteError(f"site {text!r}: unknown point {point!r}; points are {POINTS}")
    return Site(tower, int(m["block"]), point)


@dataclass(frozen=True)
class SitePattern:
    """`{tower}.blocks.*.{point}`: one point in every block of a tower."""

    tower: str
    point: str

    def __str__(self) -> str:
        return f"{self.tower}.blocks.*.{self.point}"

    def expand(self, n_blocks: int) -> list[Site]:
        return [Site(self.tower, b, self.point) for b in range(n_blocks)]


_PATTERN = re.compile(r"^(?P<tower>[a-z]+)\.blocks\.\*\.(?P<point>[a-z_]+)$")


def parse_pattern(text: str) -> Site | SitePattern:
    """A site, or a pattern with `*` in the block position, checked against the grammar."""
    m = _PATTERN.match(text.strip())
    if m is None:
        return parse_site(text)
    if m["tower"] not in TOWERS:
        raise SiteError(f"site pattern {text!r}: unknown tower {m['tower']!r}; towers are {TOWERS}")
    if m["point"] not in POINTS:
        raise SiteError(f"site pattern {text!r}: unknown point {m['point']!r}; points are {POINTS}")
    return SitePattern(m["tower"], m["point"])


def expand_sites(patterns: list[str], n_blocks: dict[str, int]) -> list[str]:
    """Expand `*` in the block position (`encoder.blocks.*.resid_post`) and check every site
    against the model's depth. Returns canonical strings, sorted by tower then depth, deduplicated."""
    out: set[Site] = set()
    for pattern in patterns:
        if pattern.strip() == "latent" and "latent" not in n_blocks:
            raise SiteError(f"site 'latent': this model has no latent sequence; it has the towers {sorted(n_blocks)}")
        site = parse_pattern(pattern)
        if isinstance(site, SitePattern):
            if site.tower not in n_blocks:
                raise SiteError(f"site {pattern!r}: this model has no tower {site.tower!r}; it has {sorted(n_blocks)}")
            out.update(site.expand(n_blocks[site.tower]))
            continue
        if site.tower not in n_blocks:
            raise SiteError(f"site {pattern!r}: this model has no tower {site.tower!r}; it has {sorted(n_blocks)}")
        if site.block >= n_blocks[site.tower]:
            raise SiteError(
                f"site {pattern!r}: block {site.block} is past the model's depth "
                f"({site.tower} has blocks 0..{n_blocks[site.tower] - 1})"
            )
        out.add(site)
    return [str(s) for s in sorted(out)]
