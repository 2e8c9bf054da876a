"""Steer one clip outside the workflow (the `affectlens steer` / `affectlens tts` commands).

The vector comes from a file the workflow saved, or from two reference clips (the difference of
their pooled site activations, target minus source). The activation -> mel mapper comes from a
folder the workflow saved or, failing that, is fit on the fly on the reference clips and the input
itself: a handful of seconds instead of a corpus, so a lower-quality inversion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SR = 16000


def load_wave(path: str | Path, sr: int = SR) -> np.ndarray:
    """Mono float32 at `sr` from any file soundfile or FFmpeg reads."""
    from affectlens.io_audio import resample
    from affectlens.steering.watermark import load_any

    w, file_sr = load_any(path)
    return resample(w, file_sr, sr).astype(np.float32)


def load_vector(path: str | Path, key: str | None = None) -> np.ndarray:
    """A [d] steering vector from .npy, .npz or .safetensors (`key` picks a tensor where several are
    stored; a file holding exactly one needs none)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"steering vector file {path} does not exist")
    if path.suffix == ".npy":
        v = np.load(path, allow_pickle=False)
    elif path.suffix in (".npz", ".safetensors"):
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                tensors = {k: z[k] for k in z.files}
        else:
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
        if key is None and len(tensors) != 1:
            raise ValueError(f"{path} holds {sorted(tensors)}; name one with --vector-key")
        v = tensors[key] if key is not None else next(iter(tensors.values()))
    else:
        raise ValueError(f"cannot read a steering vector from {path}: use .npy, .npz or .safetensors")
    v = np.asarray(v, dtype=np.float32).squeeze()
    if v.ndim != 1:
        raise ValueError(f"steering vector in {path} has shape {v.shape}; expected [d]")
    return v


def site_frames(adapter, wave: np.ndarray, site: str, interventions: dict | None = None) -> np.ndarray:
    """[frame, d] activations of one clip at `site`, optionally with `interventions` {site: edit}
    installed (at that site or upstream of it)."""
    batch = adapter.prepare([wave])
    n = batch.n_frames[0]
    _, cache = adapter.run(batch, capture=[site], interventions=interventions)
    return cache[site][0, :n].float().cpu().numpy()


def reference_axis(adapter, site: str, ref_from: list[np.ndarray], ref_to: list[np.ndarray]) -> np.ndarray:
    """[d]: mean pooled activation of the `to` clips minus that of the `from` clips."""
    pooled = lambda waves: np.mean([site_frames(adapter, w, site).mean(0) for w in waves], axis=0)  # noqa: E731
    return (pooled(ref_to) - pooled(ref_from)).astype(np.float32)


def fit_mapper_on_the_fly(adapter, site: str, waves: list[np.ndarray], seed: int = 0, vocoder=None):
    """A ridge MelMapper fit on just these clips (no corpus; in `vocoder`'s mel format when given):
    usable, lower quality than a saved one."""
    from affectlens.steering.inversion import MelMapper

    mapper = (MelMapper(seed=seed) if vocoder is None
              else MelMapper.for_vocoder(vocoder, adapter.frame_rate, seed=seed))
    return mapper.fit([site_frames(adapter, w, site) for w in waves], waves, sr=adapter.sample_rate)


def inversion_site(sites: list[str]) -> str:
    """The site a multi-site edit is heard from: the deepest one (its activations carry the effect of
    every edit upstream of it), resid_post first within a block."""
    from affectlens.models.sites import parse_site

    parsed = {s: parse_site(s) for s in sites}
    towers = {p.tower for p in parsed.values()}
    if len(towers) > 1:
        raise ValueError(f"steering several sites needs them in one tower (got {sorted(towers)}): the edit is "
                         "heard from the deepest")
    return max(sites, key=lambda s: (parsed[s].depth, parsed[s].point == "resid_post"))


def steer_wave(adapter, wave: np.ndarray, site: str | list[str], vector, alpha: float, mapper,
               mode: str = "residual", frames: tuple[int, int] | None = None, vocoder=None) -> np.ndarray:
    """Add alpha * vector at `site` (only in activation frames [start, stop) when `frames` is given)
    and invert the steered activations to a wave at the adapter's rate. Several sites: `site` and
    `vector` are lists, one vector per site, all applied in one forward pass, and the mapper reads
    the deepest of them (`inversion_site`)."""
    from affectlens.steering.inversion import invert
    from affectlens.steering.vectors import add_vector

    sites = [site] if isinstance(site, str) else list(site)
    vectors = [vector] if isinstance(site, str) else list(vector)
    if len(vectors) != len(sites):
        raise ValueError(f"{len(sites)} sites but {len(vectors)} steering vectors: give one vector per site")
    read = inversion_site(sites)
    unsteered = site_frames(adapter, wave, read)
    steered = site_frames(adapter, wave, read, {s: add_vector(v, alpha, frames=frames) for s, v in zip(sites, vectors)})
    return invert(mapper, unsteered, steered, wave, mode=mode, vocoder=vocoder, sr=adapter.sample_rate)
