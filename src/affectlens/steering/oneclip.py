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


def pooled_frames(adapter, waves: list[np.ndarray], site: str, batch_size: int = 8) -> np.ndarray:
    """[clip, d]: each clip's mean activation at `site` over its own frames, forwards in batches."""
    out = []
    for i in range(0, len(waves), batch_size):
        batch = adapter.prepare(waves[i:i + batch_size])
        _, cache = adapter.run(batch, capture=[site])
        acts = cache[site]
        out += [acts[j, :n].float().mean(0).cpu().numpy() for j, n in enumerate(batch.n_frames)]
    return np.stack(out)


def reference_axis(adapter, site: str, ref_from: list[np.ndarray], ref_to: list[np.ndarray]) -> np.ndarray:
    """[d]: mean pooled activation of the `to` clips minus that of the `from` clips."""
    pooled = lambda waves: np.mean([site_frames(adapter, w, site).mean(0) for w in waves], axis=0)  # noqa: E731
    return (pooled(ref_to) - pooled(ref_from)).astype(np.float32)


def fit_mapper_on_the_fly(adapter, site: str, waves: list[np.ndarray], seed: int = 0, vocoder=None,
                          kind: str = "ridge"):
    """A MelMapper of `kind` (ridge, mlp) fit on just these clips (no corpus; in `vocoder`'s mel
    format when given): usable, lower quality than a saved one."""
    from affectlens.steering.inversion import MelMapper

    mapper = (MelMapper(kind=kind, seed=seed) if vocoder is None
              else MelMapper.for_vocoder(vocoder, adapter.frame_rate, kind=kind, seed=seed))
    return mapper.fit([site_frames(adapter, w, site) for w in waves], waves, sr=adapter.sample_rate)


def inversion_site(sites: list[str]) -> str:
    """The deepest of several steered sites (its activations carry the effect of every edit upstream
    of it), resid_post first within a block."""
    from affectlens.models.sites import parse_site

    parsed = {s: parse_site(s) for s in sites}
    towers = {p.tower for p in parsed.values()}
    if len(towers) > 1:
        raise ValueError(f"steering several sites needs them in one tower (got {sorted(towers)}): the edit is "
                         "heard from the deepest")
    return max(sites, key=lambda s: (parsed[s].depth, parsed[s].point == "resid_post"))


def resolve_hear_site(spec: str, sites: list[str], n_blocks: dict[str, int]) -> str:
    """The site the mel mapper reads for an edit at `sites`: `last` (the last block's resid_post of
    their tower: the edit propagates through every block in between), `steer` (the deepest steered
    site itself: the mapper then sees exactly x + alpha v, and a ridge mapper's change is one fixed
    spectral curve for every frame), or a site of the same tower at or after the deepest steered site."""
    from affectlens.models.sites import expand_sites, parse_site

    deepest = inversion_site(sites)
    steer = parse_site(deepest)
    if spec == "steer":
        return deepest
    if spec == "last":
        return f"{steer.tower}.blocks.{n_blocks[steer.tower] - 1}.resid_post"
    hear = parse_site(expand_sites([spec], n_blocks)[0])
    if hear.tower != steer.tower or hear.depth < steer.depth:
        raise ValueError(f"hear site {spec!r} must be in the steered site's tower at or after {deepest!r}")
    return str(hear)


def _interventions(sites, vectors, alpha, frames):
    from affectlens.steering.vectors import add_vector

    if len(vectors) != len(sites):
        raise ValueError(f"{len(sites)} sites but {len(vectors)} steering vectors: give one vector per site")
    return {s: add_vector(v, alpha, frames=frames) for s, v in zip(sites, vectors)}


def steer_wave(adapter, wave: np.ndarray, site: str | list[str], vector, alpha: float, mapper,
               mode: str = "residual", frames: tuple[int, int] | None = None, vocoder=None,
               hear_site: str | None = None) -> np.ndarray:
    """Add alpha * vector at `site` (only in activation frames [start, stop) when `frames` is given)
    and invert the change this makes at `hear_site` (default the deepest steered site) to a wave
    at the adapter's rate; `mapper` must read `hear_site`. Several sites: `site` and `vector` are
    lists, one vector per site, all applied in one forward pass."""
    from affectlens.steering.inversion import invert

    sites = [site] if isinstance(site, str) else list(site)
    vectors = [vector] if isinstance(site, str) else list(vector)
    edits = _interventions(sites, vectors, alpha, frames)
    read = hear_site or inversion_site(sites)
    unsteered = site_frames(adapter, wave, read)
    steered = site_frames(adapter, wave, read, edits)
    return invert(mapper, unsteered, steered, wave, mode=mode, vocoder=vocoder, sr=adapter.sample_rate)


def mel_shift_from_references(mapper, ref_from: list[np.ndarray], ref_to: list[np.ndarray], sr: int = SR) -> np.ndarray:
    """[n_mels]: mean log-mel spectrum (the mapper's mel format) of the `to` clips minus the `from` clips."""
    from affectlens.io_audio import resample
    from affectlens.steering.inversion import log_mel

    cfg = mapper.mel_config
    spectrum = lambda waves: np.mean([log_mel(resample(w, sr, cfg.sr), cfg).mean(0) for w in waves], axis=0)  # noqa: E731
    return (spectrum(ref_to) - spectrum(ref_from)).astype(np.float32)


def control_wave(control: str, adapter, wave: np.ndarray, site: str | list[str], vector, alpha: float, mapper,
                 mode: str = "residual", vocoder=None, hear_site: str | None = None, mel_shift=None,
                 seed: int = 0, frames: tuple[int, int] | None = None) -> np.ndarray:
    """The control a listener A/Bs against the model's edit of the same size (steering.experiment):
    `gain` the clip re-levelled to the steered wave's active level; `mel_shift` alpha * `mel_shift`
    [n_mels] on every frame, rendered like the edit (model-free); `random` a random direction per
    site with its vector's norm (seed `seed`), through the model like the edit."""
    from affectlens.steering.experiment import CONTROLS, fixed_change, gain_control, random_directions
    from affectlens.steering.inversion import render_change

    sites = [site] if isinstance(site, str) else list(site)
    vectors = [vector] if isinstance(site, str) else list(vector)
    if control == "gain":
        steered = steer_wave(adapter, wave, sites, vectors, alpha, mapper, mode, frames, vocoder, hear_site)
        return gain_control(wave, steered, adapter.sample_rate)
    if control == "random":
        randoms = [random_directions(len(v), float(np.linalg.norm(v)), 1, seed + i)[0] for i, v in enumerate(vectors)]
        return steer_wave(adapter, wave, sites, randoms, alpha, mapper, mode, frames, vocoder, hear_site)
    if control == "mel_shift":
        if mel_shift is None:
            raise ValueError("the mel_shift control needs a mel shift: reference clips (--ref-from/--ref-to) or "
                             "the mel_shift.npy the workflow saves beside vector.npy")
        hear0 = site_frames(adapter, wave, hear_site or inversion_site(sites))
        change = fixed_change(mel_shift, alpha, len(hear0) * mapper.upsample)
        return render_change(mapper, hear0, change, wave, mode=mode, vocoder=vocoder, sr=adapter.sample_rate)
    raise ValueError(f"control {control!r}: choose from {CONTROLS}")
