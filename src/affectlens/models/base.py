"""What every model adapter offers, and the one hook mechanism behind reading and editing sites.

An intervention is a function `(activation [batch, frame, d], site) -> activation`. Patching,
ablation and steering are all interventions installed for one forward pass; capturing is the
same hook without an edit. Hooks are removed when the `hooks` block ends, also on error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from affectlens.models.positions import Positions, audio_positions
from affectlens.models.sites import Site, SiteError, expand_sites, parse_site

Intervention = Callable[[torch.Tensor, str], torch.Tensor]


@dataclass
class Batch:
    """Model inputs for a batch of clips plus, per clip, how many frames hold real signal.

    `n_frames` counts the real frames of the adapter's first tower, which lie at the start of the
    padded sequence. `positions` (per tower, one table per clip) says exactly which rows of each
    tower's padded sequence are real and where each came from; a tower missing there has its
    real frames first, `n_frames` of them (see `Adapter.positions`)."""

    inputs: dict[str, Any]
    n_frames: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    positions: dict[str, list[Positions]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.n_frames)

    def repeat(self, n: int) -> "Batch":
        """Each clip n times in a row along the batch axis (for batched interventions). Inputs whose
        rows are not one per clip (a vision tower's patches of all clips concatenated) are named in
        `meta["flat_rows"]` with their rows per clip, and repeated clip by clip."""
        flat = self.meta.get("flat_rows", {})

        def rep(key, v):
            if not isinstance(v, torch.Tensor):
                return v
            if key in flat:
                return torch.cat([part for part in torch.split(v, flat[key]) for _ in range(n)])
            return v.repeat_interleave(n, dim=0)

        meta = dict(self.meta)
        if flat:
            meta["flat_rows"] = {k: [r for r in rows for _ in range(n)] for k, rows in flat.items()}
        return Batch(
            {k: rep(k, v) for k, v in self.inputs.items()},
            [f for f in self.n_frames for _ in range(n)],
            meta,
            {t: [p for p in ps for _ in range(n)] for t, ps in self.positions.items()},
        )


class Adapter(ABC):
    """One model family. Subclasses map sites to modules; nothing outside `models/` knows paths."""

    family: str = ""
    sample_rate: int = 16000
    frame_rate: float = 50.0  # frames per second along the tower's time axis
    # What one clip's input is made of, in the order `prepare` takes it: ("audio",) -> a wave,
    # ("text",) -> a string, several -> a dict {"audio": wave, "text": str, "video": frames}.
    inputs: tuple[str, ...] = ("audio",)
    # How a clip reaches the model when a family has several ways (Whisper: "padded-30s" or
    # "trimmed"); stored with every store, and stores of different regimes never merge.
    input_regime: str = "native"

    def __init__(self, model: nn.Module, model_id: str, revision: str = "", device: str = "cpu"):
        self.model = model.eval()
        self.model_id = model_id
        self.revision = revision
        self.device = torch.device(device)

    # --- what a family defines -------------------------------------------------------------
    @property
    @abstractmethod
    def n_blocks(self) -> dict[str, int]:
        """Number of blocks per tower, e.g. {"encoder": 4}."""

    @abstractmethod
    def _hook_point(self, site: Site) -> tuple[nn.Module, str]:
        """(module, "pre" | "post"): the site is the module's first input or its (first) output."""

    @abstractmethod
    def prepare(self, waves: list[np.ndarray]) -> Batch:
        """16 kHz mono float waves -> model inputs and real frame counts."""

    @abstractmethod
    def forward(self, batch: Batch) -> Any:
        """Run the model on a prepared batch (under the caller's hooks)."""

    # --- shared ------------------------------------------------------------------------------
    def sites(self, patterns: Iterable[str] | None = None) -> list[str]:
        """Canonical site names; all sites of the model when no pattern is given."""
        if patterns is None:
            patterns = [f"{t}.embed" for t in self.n_blocks] + [
                f"{t}.blocks.*.{p}" for t in self.n_blocks for p in ("resid_post", "attn_out", "mlp_out")
            ]
        return expand_sites(list(patterns), self.n_blocks)

    def site_attrs(self, site: str) -> dict:
        """What the store records beside a site's matrices: for attn_heads, `n_heads` and `d_head`
        (the columns of head h are h * d_head ... (h + 1) * d_head - 1); nothing for other sites."""
        parsed = parse_site(site)
        if parsed.point != "attn_heads":
            return {}
        proj, _ = self._hook_point(parsed)
        n = head_count(self.model, proj, site)
        return {"n_heads": n, "d_head": proj.in_features // n}

    def frames_for(self, n_samples: int) -> int:
        """Frames of real signal for a clip of n_samples at `sample_rate`."""
        return int(np.ceil(n_samples * self.frame_rate / self.sample_rate))

    def positions(self, batch: Batch, tower: str) -> list[Positions]:
        """Per clip, the real positions of `tower` in the padded batch and where they came from."""
        if tower in batch.positions:
            return batch.positions[tower]
        return [audio_positions(n, self.frame_rate) for n in batch.n_frames]

    @contextmanager
    def hooks(
        self,
        interventions: dict[str, Intervention] | None = None,
        capture: Iterable[str] = (),
        reduce: Callable[[torch.Tensor, str], Any] | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Install interventions and captures; yields the capture cache {site: [batch, frame, d]}.
        A captured site that is also intervened on records the edited activation. With `reduce`,
        the cache holds `reduce(activation, site)` instead, computed inside the hook, so the full
        padded activation need not outlive its forward step (extraction keeps only real frames)."""
        interventions = dict(interventions or {})
        capture = list(capture)
        cache: dict[str, torch.Tensor] = {}
        handles = []
        try:
            for name in dict.fromkeys([*interventions, *capture]):
                site = parse_site(name)
                if str(site) != name:
                    raise SiteError(f"site {name!r} is spelled {str(site)!r}")
                expand_sites([name], self.n_blocks)  # depth check with a clear message
                module, where = self._hook_point(site)
                handles.append(_install(module, where, name, interventions.get(name), name in capture, cache, reduce))
            yield cache
        finally:
            for h in handles:
                h.remove()

    @torch.inference_mode()
    def run(
        self,
        batch: Batch,
        capture: Iterable[str] = (),
        interventions: dict[str, Intervention] | None = None,
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        with self.hooks(interventions, capture) as cache:
            out = self.forward(batch)
        return out, cache

    def run_from(self, batch: Batch, site: str, activation: torch.Tensor,
                 capture: Iterable[str] = (), interventions: dict[str, Intervention] | None = None,
                 ) -> tuple[Any, dict[str, torch.Tensor]]:
        """Run with the whole activation at `site` replaced by `activation` [batch, frame, d].
        Only sites at or after `site` may be captured, and `interventions` act at sites after it
        (patching a site inside a block resumes at the block's input and edits the site there).
        Families that can start mid-model override this to skip the blocks before `site` (same
        result, less compute); this default runs the full forward and writes the activation in
        with a hook."""
        return self.run(batch, capture=capture,
                        interventions={**(interventions or {}), site: lambda act, _: activation})


# Names of a block's attention output projection and feed-forward second linear, across the
# transformers families the adapters hook (Whisper, wav2vec2 & co., Qwen2 LMs, Qwen-VL vision
# blocks, T5, MusicGen, BERT): their inputs are the sites attn_heads and mlp_hidden.
OUT_PROJ_NAMES = ("out_proj", "o_proj", "proj", "o", "out_lin", "dense")
DOWN_PROJ_NAMES = ("fc2", "down_proj", "output_dense", "wo", "lin2", "dense")
HEAD_COUNT_NAMES = ("num_heads", "num_attention_heads", "n_heads", "n_head")


def _linear_in(module: nn.Module, names: tuple[str, ...], what: str, where: str) -> nn.Module:
    """`module` itself when it is a linear layer, else its one child linear layer named in `names`."""
    if isinstance(module, nn.Linear):
        return module
    found = [n for n in names if isinstance(getattr(module, n, None), nn.Linear)]
    if not found:
        raise SiteError(f"{where}: the module {type(module).__name__} has no {what} among the children {names} "
                        "(a mixture of experts has one per expert, and no single site)")
    return getattr(module, found[0])


def block_hook_point(layers: nn.ModuleList, site: Site, attn: str = "self_attn", mlp: str = "mlp") -> tuple[nn.Module, str]:
    """Sites of a stack of residual blocks: embed is the input to block 0, attn_out / mlp_out the
    outputs of the submodules at the paths `attn` / `mlp` (attention and feed-forward, or
    mixture-of-experts, before they join the residual), resid_post the block's output;
    attn_heads the input of the attention's output projection (the per-head outputs, concatenated
    head-major), mlp_hidden the input of the feed-forward's second linear (after the activation).
    Where `attn` / `mlp` name the projection itself (Whisper's `fc2`, BERT's `attention.output.dense`)
    the finer point is its input."""
    if site.point == "embed":
        return layers[0], "pre"
    layer = layers[site.block]
    if site.point == "attn_heads":
        return _linear_in(layer.get_submodule(attn), OUT_PROJ_NAMES, "output projection", str(site)), "pre"
    if site.point == "mlp_hidden":
        return _linear_in(layer.get_submodule(mlp), DOWN_PROJ_NAMES, "second linear", str(site)), "pre"
    return {"resid_post": (layer, "post"), "attn_out": (layer.get_submodule(attn), "post"),
            "mlp_out": (layer.get_submodule(mlp), "post")}[site.point]


def head_count(model: nn.Module, proj: nn.Module, where: str) -> int:
    """Heads whose outputs the linear `proj` (an attention's output projection) reads: from the
    nearest module around it (itself, an ancestor, or an ancestor's child: BERT keeps the count
    on its self-attention, beside the output projection's parent) that states `head_dim` or a head
    count, checked against the projection's input width."""
    names = {id(m): n for n, m in model.named_modules()}
    path = names.get(id(proj))
    if path is None:
        raise SiteError(f"{where}: the output projection is not a module of the model")
    width = proj.in_features
    parts = path.split(".")
    for i in range(len(parts), -1, -1):
        ancestor = model.get_submodule(".".join(parts[:i]))
        for m in (ancestor, *ancestor.children()):
            head_dim = getattr(m, "head_dim", None)
            if isinstance(head_dim, int) and head_dim > 0 and width % head_dim == 0:
                return width // head_dim
            for name in HEAD_COUNT_NAMES:
                n = getattr(m, name, None)
                if isinstance(n, int) and n > 0 and width % n == 0:
                    return n
        if i < len(parts) - 2:  # past the block: a count there (a whole model's) may be another tower's
            break
    raise SiteError(f"{where}: no module around {path} states its attention's head count")


def _install(module: nn.Module, where: str, site: str, edit: Intervention | None, keep: bool, cache: dict,
             reduce: Callable[[torch.Tensor, str], Any] | None = None):
    """Our hook runs before any hook already on the module: transformers records
    `output_hidden_states` with forward hooks of its own, installed at the first such call and kept,
    and some models build later inputs from those records (Qwen-Omni's Talker reads the Thinker's),
    so an edit must come before the recorder to reach them whatever ran before."""
    def apply(hidden: torch.Tensor) -> torch.Tensor:
        if edit is not None:
            new = edit(hidden, site)
            if new.shape != hidden.shape:
                raise ValueError(f"intervention at {site} changed the shape {tuple(hidden.shape)} -> {tuple(new.shape)}")
            hidden = new.to(hidden.dtype)
        if keep:
            cache[site] = hidden.detach() if reduce is None else reduce(hidden.detach(), site)
        return hidden

    if where == "pre":

        def pre_hook(mod, args, kwargs):
            if args:
                return (apply(args[0]), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = apply(kwargs["hidden_states"])
            return args, kwargs

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)

    def post_hook(mod, args, output):
        if isinstance(output, tuple):
            return (apply(output[0]), *output[1:])
        if hasattr(output, "last_hidden_state"):  # ModelOutput
            output.last_hidden_state = apply(output.last_hidden_state)
            return output
        return apply(output)

    return module.register_forward_hook(post_hook, prepend=True)
