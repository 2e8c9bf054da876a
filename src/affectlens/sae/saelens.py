"""SAELens's on-disk format: a folder with `cfg.json` and `sae_weights.safetensors`, written and
read here without importing sae_lens (tested against the release in `SAELENS_VERSION`).

Architectures, ours -> SAELens's inference classes (and back):

    relu       <-> standard    latents = ReLU((x - b_dec) @ W_enc + b_enc)
    topk       <-> topk        k kept per frame (rescale_acts_by_decoder_norm false on export;
                               folded into the weights on import when true)
    jumprelu   <-> jumprelu    threshold = exp(log_threshold) per latent
    batchtopk   -> jumprelu    its one inference threshold copied to every latent, with
                               metadata.training_architecture "batchtopk": how SAELens saves its own
                               BatchTopK SAEs. A jumprelu with that tag and one threshold for every
                               latent comes back as batchtopk; any other jumprelu as jumprelu.

Normalisation is folded, not declared. Ours centres and scales the input, x_n = (x - m) * s, and
SAELens's `normalize_activations` has no mode that centres (and "expected_average_only_in" is
applied by its trainer, not by a loaded SAE), so the export writes "none" and

    W_enc' = s * W_enc^T      b_dec' = m + b_dec / s      W_dec' = W_dec / s      b_enc' = b_enc

which gives the same latents and the same reconstruction of the raw frames x. The import does the
reverse with m = 0, s = 1 (and folds apply_b_dec_to_input = false into b_enc), so the SAE read here
encodes and decodes exactly what SAELens's `SAE.load_from_disk` does. Latents are in the units of
our normalised input on both sides. W_enc is [d_in, d_sae] in SAELens's file, [latent, d_in] in ours.

Hook names: one table, `HOOKS`, maps a site's point to a TransformerLens-style hook inside a block;
the tower prefixes the name, since a TransformerLens model has one tower and ours have several:

    {tower}.embed                  <-> {tower}.blocks.0.hook_resid_pre   (the input to block 0)
    {tower}.blocks.{L}.resid_post  <-> {tower}.blocks.{L}.hook_resid_post
    {tower}.blocks.{L}.attn_out    <-> {tower}.blocks.{L}.hook_attn_out
    {tower}.blocks.{L}.mlp_out     <-> {tower}.blocks.{L}.hook_mlp_out
    {tower}.blocks.{L}.attn_heads  <-> {tower}.blocks.{L}.attn.hook_z    (reshape_activations hook_z)
    {tower}.blocks.{L}.mlp_hidden  <-> {tower}.blocks.{L}.mlp.hook_post
    latent                         <-> latent

`{tower}.blocks.{L}.hook_resid_pre` reads back as `{tower}.blocks.{L-1}.resid_post` (L > 0), the
site grammar's one spelling of that tensor; a hook name without a tower (`blocks.3.hook_resid_post`,
as SAELens's language-model SAEs have) needs the tower given.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from affectlens import __version__
from affectlens.io import atomic_path, write_json
from affectlens.models.sites import SiteError, parse_site
from affectlens.sae.registry import architecture_of, build

log = logging.getLogger(__name__)

SAELENS_VERSION = "6.54.12"
"""The sae_lens release the format follows and the tests run against (pyproject's `test` extra pins
it; a test checks they agree). Written as metadata.sae_lens_version: SAELens reads any config
without a version >= 6 as its older layout."""
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"

HOOKS = {
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "attn_heads": "attn.hook_z",
    "mlp_hidden": "mlp.hook_post",
}
"""A site's point -> the TransformerLens hook inside block L (the module docstring has the whole map)."""
RESID_PRE = "hook_resid_pre"

EXPORTED = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
"""Our architecture -> the SAELens inference architecture it is written as."""
TRAINED_AS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}
"""Our architecture -> SAELens's name for the way it was trained (metadata.training_architecture)."""

_WEIGHTS = {"standard": {"W_enc", "W_dec", "b_enc", "b_dec"}, "topk": {"W_enc", "W_dec", "b_enc", "b_dec"},
            "jumprelu": {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}}
_RUN_TIME_NORMS = ("constant_norm_rescale", "layer_norm")
"""SAELens normalisations applied per frame at run time: not an affine map, so not foldable."""
_HOOK = re.compile(r"^(?:(?P<tower>[a-z]+)\.)?blocks\.(?P<block>\d+)\.(?P<hook>[a-z_.]+)$")


# -- hook names ---------------------------------------------------------------------------------

def hook_name(site: str) -> str:
    """The SAELens `hook_name` of one of our sites (`encoder.blocks.3.resid_post` ->
    `encoder.blocks.3.hook_resid_post`)."""
    s = parse_site(site)
    if s.point == "latent":
        return "latent"
    if s.point == "embed":
        return f"{s.tower}.blocks.0.{RESID_PRE}"
    if s.point not in HOOKS:
        raise SiteError(f"site {site!r}: point {s.point!r} has no SAELens hook name (affectlens.sae.saelens.HOOKS "
                        f"maps {sorted(HOOKS)})")
    return f"{s.tower}.blocks.{s.block}.{HOOKS[s.point]}"


def site_of_hook(hook: str, tower: str | None = None) -> str:
    """Our site for an SAELens `hook_name`; `tower` names the tower when the hook name has none
    (`blocks.3.hook_resid_post` with tower "encoder" -> `encoder.blocks.3.resid_post`)."""
    if hook == "latent":
        return "latent"
    m = _HOOK.match(hook or "")
    points = {v: k for k, v in HOOKS.items()}
    if m is None or (m["hook"] != RESID_PRE and m["hook"] not in points):
        raise SiteError(f"SAELens hook_name {hook!r} has no affectlens site: give '[tower.]blocks.L.<hook>' with "
                        f"<hook> in {sorted([RESID_PRE, *points])}")
    if m["tower"] and tower and m["tower"] != tower:
        raise SiteError(f"SAELens hook_name {hook!r} names the tower {m['tower']!r}, not the {tower!r} given")
    tower = m["tower"] or tower
    if not tower:
        raise SiteError(f"SAELens hook_name {hook!r} names no tower (a TransformerLens model has one); give the "
                        "tower the SAE reads, e.g. tower='encoder' (--tower encoder)")
    block = int(m["block"])
    if m["hook"] == RESID_PRE:
        site = f"{tower}.embed" if block == 0 else f"{tower}.blocks.{block - 1}.resid_post"
    else:
        site = f"{tower}.blocks.{block}.{points[m['hook']]}"
    return str(parse_site(site))


# -- export -------------------------------------------------------------------------------------

@torch.no_grad()
def to_saelens(sae: torch.nn.Module, site: str, model_name: str | None = None) -> tuple[dict, dict[str, Tensor]]:
    """SAELens's config dict and float32 state dict of one of our SAEs read at `site`, with its
    input normalisation folded into the weights (module docstring)."""
    architecture = architecture_of(sae)
    hook = hook_name(site)
    p = {k: v.detach().to("cpu", torch.float64) for k, v in sae.state_dict().items()}
    s, m = p["input_scale"], p["input_mean"]
    state = {"W_enc": (p["W_enc"] * s).T, "W_dec": p["W_dec"] / s, "b_enc": p["b_enc"], "b_dec": m + p["b_dec"] / s}
    n_latents = sae.cfg.n_latents
    if architecture == "jumprelu":
        state["threshold"] = p["log_threshold"].exp()
    elif architecture == "batchtopk":
        state["threshold"] = p["threshold"].expand(n_latents)
    state = {k: v.to(torch.float32).contiguous() for k, v in state.items()}
    details = {"k": sae.cfg.k} if architecture == "batchtopk" else {}
    cfg = {
        "architecture": EXPORTED[architecture],
        "d_in": sae.cfg.d_in,
        "d_sae": n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if hook.endswith(".hook_z") else "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": None,  # trained by affectlens, not by sae_lens
            "model_name": model_name,
            "hook_name": hook,
            "hook_head_index": None,
            "prepend_bos": False,
            "training_architecture": TRAINED_AS[architecture],
            "training_architecture_details": details,
            "affectlens": {"version": __version__, "architecture": architecture, "config": sae.cfg.to_dict()},
        },
    }
    if architecture == "topk":
        cfg |= {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}
    return cfg, state


def save_saelens(sae: torch.nn.Module, out_dir: str | Path, site: str, model_name: str | None = None) -> Path:
    """Write `sae` (read at `site`) into `out_dir` as SAELens's `cfg.json` + `sae_weights.safetensors`,
    each via a temporary file and a rename. Returns out_dir."""
    out_dir = Path(out_dir)
    if (out_dir / "sae.safetensors").exists():
        raise FileExistsError(f"{out_dir} holds an affectlens SAE (sae.safetensors); SAELens's cfg.json has the "
                              "same name as ours, so export into a folder of its own")
    cfg, state = to_saelens(sae, site, model_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    write_json(out_dir / CFG_FILE, cfg)
    return out_dir


# -- import -------------------------------------------------------------------------------------

def read_saelens(path: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """The config (in SAELens 6's layout, older layouts brought up to it) and state dict of an
    SAELens SAE folder, with errors that name the file."""
    cfg = read_saelens_cfg(path)
    weights = _need(Path(path) / WEIGHTS_FILE)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    return cfg, state


def read_saelens_cfg(path: str | Path) -> dict:
    """The config of an SAELens SAE folder in SAELens 6's layout (older layouts brought up to it)."""
    cfg_path = _need(Path(path) / CFG_FILE)
    _need(Path(path) / WEIGHTS_FILE)
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: holds a {type(cfg).__name__}, not an SAELens config object")
    return _v6_layout(cfg, cfg_path)


def _need(f: Path) -> Path:
    if not f.is_file():
        hint = (" (it holds an affectlens SAE: load that with format='affectlens')"
                if (f.parent / "sae.safetensors").is_file() else "")
        raise FileNotFoundError(f"{f} is missing; {f.parent} is not an SAELens SAE folder{hint}")
    return f


def _v6_layout(cfg: dict, where: Path | str) -> dict:
    """Configs written before SAELens 6 (no metadata.sae_lens_version >= 6) in the 6.x layout, the
    way SAELens's `handle_pre_6_0_config` reads them."""
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    if version and _major(version) >= 6:
        return cfg
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
    old = {renames.get(k, k): v for k, v in cfg.items()}
    new = {k: old[k] for k in ("d_in", "d_sae", "dtype", "apply_b_dec_to_input", "normalize_activations",
                               "reshape_activations", "k", "rescale_acts_by_decoder_norm") if k in old}
    new["architecture"] = old.get("architecture", "standard")
    activation = old.get("activation_fn", "relu")
    if activation == "topk" and (old.get("activation_fn_kwargs") or {}).get("k") is not None:
        new |= {"architecture": "topk", "k": old["activation_fn_kwargs"]["k"]}
    elif new["architecture"] == "standard" and activation != "relu":
        raise ValueError(f"{where}: activation_fn {activation!r}; affectlens reads relu and topk SAEs")
    if isinstance(new.get("normalize_activations"), bool):
        new["normalize_activations"] = "expected_average_only_in" if new["normalize_activations"] else "none"
    new.setdefault("normalize_activations", "none")
    new.setdefault("reshape_activations", "hook_z" if "hook_z" in (old.get("hook_name") or "") else "none")
    new["metadata"] = {k: old.get(k) for k in ("model_name", "hook_name", "hook_head_index")}
    return new


def _major(version: str) -> int:
    m = re.match(r"\d+", str(version))
    return int(m.group()) if m else 0


@torch.no_grad()
def from_saelens(cfg: dict, state: dict[str, Tensor], where: str | Path = CFG_FILE) -> torch.nn.Module:
    """One of our SAEs (input mean 0, scale 1, in eval mode) that computes what SAELens's inference
    SAE of `cfg` (6.x layout) and `state` computes; `where` names the config in errors."""
    architecture = cfg.get("architecture", "standard")
    if architecture not in _WEIGHTS:
        raise ValueError(f"{where}: SAELens architecture {architecture!r}; affectlens reads {sorted(_WEIGHTS)} "
                         "(SAELens saves BatchTopK SAEs as jumprelu)")
    norm = cfg.get("normalize_activations", "none")
    if norm in _RUN_TIME_NORMS:
        raise ValueError(f"{where}: normalize_activations {norm!r} rescales each frame at run time, which an "
                         "affectlens SAE cannot express; only 'none' (or a normalisation already folded) is read")
    if norm != "none":  # SAELens's trainer folds these before saving; its load_from_disk applies nothing
        log.warning("%s: normalize_activations %r is not applied when SAELens loads an SAE from disk; reading the "
                    "weights as they are, as SAELens does", where, norm)
    missing = [k for k in ("d_in", "d_sae", *(("k",) if architecture == "topk" else ())) if k not in cfg]
    if missing:
        raise ValueError(f"{where}: a {architecture} SAE's config needs the keys {missing}")
    head = (cfg.get("metadata") or {}).get("hook_head_index")
    if head is not None:
        log.warning("%s: an SAE of one attention head (hook_head_index %s): give it that head's [frame, d_head] "
                    "activations", where, head)
    state = dict(state)
    scaling = state.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):  # SAELens 6 refuses these too
        raise ValueError(f"{where}: the weights have a fine-tuning scaling_factor that is not all ones; SAELens 6 "
                         "and affectlens do not read such SAEs")
    want = _WEIGHTS[architecture]
    if set(state) != want:
        raise ValueError(f"{where}: a {architecture} SAE has the weights {sorted(want)}; the weights file has "
                         f"{sorted(state)}")
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    p = {k: v.to("cpu", torch.float64) for k, v in state.items()}
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
              "threshold": (d_sae,)}
    for k, v in p.items():
        if tuple(v.shape) != shapes[k]:
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)}, not {shapes[k]} (d_in {d_in}, d_sae {d_sae})")
    W_enc, W_dec, b_enc, b_dec = p["W_enc"], p["W_dec"], p["b_enc"], p["b_dec"]
    if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        norms = W_dec.norm(dim=1)  # SAELens's latents are pre * norm, decoded by W_dec / norm
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    if not cfg.get("apply_b_dec_to_input", True):  # ours always subtracts b_dec before encoding
        b_enc = b_enc + b_dec @ W_enc
    fixed = {"d_in": d_in, "d_sae": d_sae, "center_input": False, "normalize_input": False, "b_dec_init": "zeros"}
    ours = {"W_enc": W_enc.T, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec,
            "input_mean": torch.zeros(d_in), "input_scale": torch.ones(())}
    if architecture == "standard":
        sae = build("relu", **fixed)
    elif architecture == "topk":
        sae = build("topk", k=int(cfg["k"]), **fixed)
    else:
        threshold = p["threshold"].clamp_min(0)  # SAELens: ReLU(pre) * (pre > t), so t < 0 acts as t = 0
        meta = cfg.get("metadata") or {}
        k = (meta.get("training_architecture_details") or {}).get("k")
        if (meta.get("training_architecture") == "batchtopk" and k is not None and round(k) >= 1
                and torch.all(threshold == threshold[0])):
            sae = build("batchtopk", k=min(round(k), d_sae), **fixed)
            ours |= {"threshold": threshold[0], "threshold_set": torch.ones((), dtype=torch.bool)}
        else:
            sae = build("jumprelu", **fixed)
            ours["log_threshold"] = threshold.log()  # -inf where t = 0: pre > 0
    sae.load_state_dict({k: v.to(sae.state_dict()[k].dtype) for k, v in ours.items()})
    return sae.eval()


def load_saelens(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The SAELens SAE saved in the folder `path` (cfg.json + sae_weights.safetensors) as one of our
    SAEs, in eval mode."""
    cfg, state = read_saelens(path)
    return from_saelens(cfg, state, Path(path) / CFG_FILE).to(device)


def saelens_site(path: str | Path, tower: str | None = None) -> str:
    """Our site of the SAELens SAE in `path`, from its hook_name (see `site_of_hook`)."""
    cfg = read_saelens_cfg(path)
    hook = (cfg.get("metadata") or {}).get("hook_name")
    if not hook:
        raise ValueError(f"{Path(path) / CFG_FILE}: metadata.hook_name is missing; give the site yourself")
    return site_of_hook(hook, tower)

