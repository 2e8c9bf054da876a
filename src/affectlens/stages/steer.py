"""Stage of workflow/rules/steer.smk: steer held-out speakers' clips, beside controls, and judge them."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from affectlens.io import atomic_path, write_json
from affectlens.models import build_adapter
from affectlens.models.config import ModelConfig, readout_site
from affectlens.settings import SteerConfig
from affectlens.stages.common import write_tsv

log = logging.getLogger("affectlens")


def steer(store_path, manifest_path, model_cfg: dict, contrast: dict, params: dict, label_column: str,
          out_dir, threads: int = 1, sae_dir=None, judge_stores: dict | None = None,
          judge_models: dict | None = None) -> None:
    """Steer held-out speakers' `source` clips towards `target` at the model's steer site with each
    of `steer.methods`, heard at `steer.hear_site`, beside the controls (`steering.experiment`),
    and judge every output with judges that never saw those speakers.

    Writes audio/ (every output, watermarked), evaluation.tsv (one row per clip, method or
    control, alpha and seed), summary.tsv (means per method and alpha), controls.tsv (paired
    differences against each control with 95 % intervals), inversion_quality.tsv (the mapper's
    held-out error and the round trip, per clip), dose_response.png, vector.npy and mapper/ (fit on
    every speaker, for `affectlens steer`). `judge_stores` / `judge_models`: {name: store path} and
    {name: model config} of the models whose probes also judge. A generative music model (MusicGen)
    is steered during generation instead: `steer_music`."""
    model, cfg = ModelConfig.from_dict(model_cfg), SteerConfig.from_dict(params)
    if model.family == "musicgen":
        return steer_music(store_path, manifest_path, model, contrast, cfg, label_column, out_dir)
    from tqdm import tqdm

    from affectlens.data.manifest import read_manifest
    from affectlens.naming import PRIMARY_METHOD
    from affectlens.steering import experiment as ex
    from affectlens.steering.inversion import round_trip_quality
    from affectlens.steering.oneclip import resolve_hear_site, site_frames
    from affectlens.probes.axis import diff_of_means
    from affectlens.viz.steering import plot_dose_response

    src, tgt = contrast["source"], contrast["target"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = ClipParts.open(out_dir, {"model": model_cfg, "contrast": contrast, "steer": params,
                                     "label_column": label_column, "judge_models": judge_models},
                           [store_path, manifest_path, sae_dir, *(judge_stores or {}).values()])
    manifest = read_manifest(manifest_path)
    adapter = build_adapter(model)
    site = model.steer_site
    hear = resolve_hear_site(cfg.hear_site, [site], adapter.n_blocks)
    vocoder, new_mapper = _inversion(cfg, adapter.frame_rate)
    judge_models = {name: ModelConfig.from_dict(m) for name, m in (judge_models or {}).items()}
    corpus, read_site, sae = _corpus(store_path, manifest, model, cfg, label_column, adapter, hear, new_mapper,
                                     {n: (judge_models[n], p) for n, p in (judge_stores or {}).items()}, sae_dir,
                                     threads)
    judges = _judge_factory(corpus, cfg, tgt, adapter, read_site, judge_models, threads)
    methods = [m for m in cfg.methods if m != "pca" or corpus.pair_keys is not None]
    if len(methods) < len(cfg.methods):
        log.warning("method pca left out: the manifest has no pair_key column to pair clips across emotions")
    log.info("steering %s -> %s at %s, heard at %s (%s mapper, %s inversion); methods %s, controls %s",
             src, tgt, site, hear, cfg.mapper, cfg.inversion, methods, list(cfg.controls))

    primary = PRIMARY_METHOD if PRIMARY_METHOD in methods else methods[0]  # gain matches its level
    chosen = choose_clips(manifest, label_column, src, cfg.n_clips, cfg.seed)
    fitted = {}
    if parts.done:
        log.info("resuming: %d of %d clips were steered and judged by an earlier run with the same inputs (%s)",
                 sum(str(manifest["clip_id"].iloc[i]) in parts.done for i in chosen), len(chosen), parts.path)
    for i in tqdm(chosen, desc=f"steer {src}->{tgt}", unit="clip"):
        if str(manifest["clip_id"].iloc[i]) in parts.done:
            continue
        spk = corpus.speakers[i]
        if spk not in fitted:
            fitted[spk] = ex.fit_speaker(corpus, spk, src, tgt, methods, list(cfg.controls), cfg.random_seeds,
                                         cfg.seed, new_mapper, judges, sae=sae, sae_features=cfg.sae_features)
        fit = fitted[spk]
        clip_id, wave = str(manifest["clip_id"].iloc[i]), corpus.waves[i]
        outputs = ex.render_clip(adapter, wave, fit, site, hear, list(cfg.alphas), list(cfg.controls), cfg.inversion,
                                 vocoder=vocoder, primary=primary)
        edit = next((o for o in outputs if o.method == primary and o.alpha == max(cfg.alphas)), None)
        quality = [{"clip_id": clip_id, "speaker": spk, "vocoder": vocoder.name if vocoder else "none",
                        "mapper": cfg.mapper, "steer_site": site, "hear_site": hear,
                        "alpha": max(cfg.alphas), "change_dependence": edit.change_dependence if edit else np.nan,
                        **round_trip_quality(fit.mapper, site_frames(adapter, wave, hear), wave, vocoder=vocoder,
                                             sr=corpus.sr)}]
        reference, reference_source = _reference(manifest, i, fit.judges, wave)
        records = []
        for out, (numbers, transcript, name, mark) in zip(outputs, _judge_outputs(outputs, clip_id, wave, reference,
                                                                                   fit.judges, cfg, parts.audio)):
            for o in ex.shared_zero(out, methods, list(cfg.controls), len(fit.random_vectors)):
                records.append({"clip_id": clip_id, "speaker": spk, "method": o.method, "kind": o.kind,
                                "output": "original" if o.kind == "original" else f"{o.alpha:g}",
                                "alpha": o.alpha, "seed": np.nan if o.seed is None else o.seed, **numbers,
                                "change_dependence": o.change_dependence, "watermark_snr_db": mark, "file": name,
                                "transcript": transcript, "reference": reference,
                                "reference_source": reference_source})
        parts.add(clip_id, records, quality)
    clip_ids = [str(manifest["clip_id"].iloc[i]) for i in chosen]
    table, quality = parts.tables(clip_ids)
    columns = ex.judge_columns(list(judge_models))
    summary = ex.summarise(table, columns)
    versus = ex.compare_to_controls(table, columns)
    for r in versus[versus.control == "best_control"].itertuples():
        log.info("%s alpha %g, %s: %+.3f [%.3f, %.3f] vs best control %s%s", r.method, r.alpha, r.judge,
                 r.difference, r.ci_low, r.ci_high, r.best_control, " (beats it)" if r.beats else "")
    # For `affectlens steer --vector out_dir/vector.npy --mapper out_dir/mapper`: fit on every speaker.
    with atomic_path(out_dir / "vector.npy") as tmp:
        np.save(tmp, diff_of_means(corpus.steer_pooled, corpus.labels, corpus.speakers, src, tgt))
    full = new_mapper().fit_targets(corpus.hear_frames, corpus.mel_targets)
    full.save(out_dir / "mapper")
    with atomic_path(out_dir / "mel_shift.npy") as tmp:
        np.save(tmp, diff_of_means(ex.mean_spectra(corpus.mel_targets, full.n_mels), corpus.labels, corpus.speakers,
                                   src, tgt))
    parts.move_audio(out_dir / "audio")
    write_tsv(table, out_dir / "evaluation.tsv")
    write_tsv(quality, out_dir / "inversion_quality.tsv")
    write_tsv(versus, out_dir / "controls.tsv")
    write_tsv(summary, out_dir / "summary.tsv")
    plot_dose_response(summary, out_dir / "dose_response.png",
                       title=f"{adapter.model_id}: {src} → {tgt} at {site}, heard at {hear} ({cfg.mapper} mapper, "
                             f"{cfg.inversion} inversion" + (f", {vocoder.name})" if vocoder else ")"))
    write_json(out_dir / "vector.json", {"site": site, "hear_site": hear, "model": adapter.model_id, "source": src,
                                         "target": tgt, "method": PRIMARY_METHOD, "mapper": cfg.mapper,
                                         "speakers": int(len(np.unique(corpus.speakers))),
                                         "inversion": cfg.inversion, "vocoder": vocoder.name if vocoder else "none",
                                         "methods": methods, "controls": list(cfg.controls),
                                         "random_seeds": [cfg.seed + s for s in range(cfg.random_seeds)],
                                         "judges": columns, "judge_level_db": cfg.judge_level_db,
                                         "note": "vector.npy is the diff_of_means vector, mapper/ the mapper at the hear "
                                                 "site and mel_shift.npy the mel_shift control, fit on every speaker"})


def _inversion(cfg: SteerConfig, frame_rate: float):
    """(vocoder or None, a factory of unfitted mappers in its mel format)."""
    from affectlens.steering.inversion import MelMapper
    from affectlens.steering.vocoder import load_vocoder

    # residual filtering needs no vocoder; direct and vocoded inversion train the mapper in its mel format
    vocoder = (None if cfg.inversion == "residual"
               else load_vocoder(cfg.vocoder, n_iter=cfg.griffin_lim_iter, seed=cfg.seed))

    def new_mapper() -> MelMapper:
        if vocoder is None:
            return MelMapper(kind=cfg.mapper, seed=cfg.seed)
        return MelMapper.for_vocoder(vocoder, frame_rate, kind=cfg.mapper, seed=cfg.seed)

    return vocoder, new_mapper


def _corpus(store_path, manifest, model: ModelConfig, cfg: SteerConfig, label_column: str, adapter, hear: str,
            new_mapper, judge_stores: dict, sae_dir, threads: int):
    """(Corpus, readout site, SAE or None): what the run reads of the store and the clips."""
    from affectlens.data.decode import decode_clip
    from affectlens.probes.sweep import align_manifest
    from affectlens.acoustics import acoustic_feature_matrix, relevel
    from affectlens.steering.experiment import Corpus
    from affectlens.steering.oneclip import site_frames
    from affectlens.store import Store

    site = model.steer_site
    sr = adapter.sample_rate
    waves = [decode_clip(p, sr=sr) for p in manifest["path"]]
    with Store(store_path) as store:
        read = readout_site(model.readout_site, store.sites)
        rows = align_manifest(store.clip_ids, manifest, [label_column, "speaker"], where=str(store.path))
        steer_pooled, read_pooled = store.pooled(site)[rows], store.pooled(read)[rows]
        steer_frames = [store.clip_frames(site, r) for r in rows]
        hear_frames = ([store.clip_frames(hear, r) for r in rows] if hear in store.sites
                       else [site_frames(adapter, w, hear) for w in waves])
    judge_pooled = {}
    for name, (judge_model, path) in judge_stores.items():
        with Store(path) as store:
            rows_j = align_manifest(store.clip_ids, manifest, [label_column], where=str(store.path))
            judge_pooled[name] = store.pooled(readout_site(judge_model.readout_site, store.sites))[rows_j]
    sae = latents = None
    if "sae" in cfg.methods:
        sae, latents = _steer_sae(sae_dir, site, steer_frames)
    mel_targets = new_mapper().targets(hear_frames, waves, sr=sr)
    acoustic = acoustic_feature_matrix([relevel(w, sr, cfg.judge_level_db) for w in waves], sr, n_jobs=threads)
    pair_keys = manifest["pair_key"].astype(str).to_numpy() if "pair_key" in manifest.columns else None
    corpus = Corpus(manifest, manifest[label_column].astype(str).to_numpy(),
                    manifest["speaker"].astype(str).to_numpy(), pair_keys, waves, sr, steer_pooled, read_pooled,
                    hear_frames, mel_targets, acoustic, judge_pooled, latents)
    return corpus, read, sae


def _judge_factory(corpus, cfg: SteerConfig, target: str, adapter, read_site: str, judge_models: dict,
                   threads: int = 1):
    """judges(others, pair) -> Judges fit on the rows `pair` (the other speakers' source and target clips);
    each judge model (built once) reads its own readout site."""
    from affectlens.probes.linear import LinearProbe
    from affectlens.steering.judge import AcousticJudge
    from affectlens.steering.experiment import JudgeModel, Judges

    asr = build_adapter({"family": "whisper", "source": cfg.asr_source, "sites": ["encoder.embed"]})
    try:
        from affectlens.steering.speaker import _encoder, speaker_similarities

        _encoder()
    except ImportError as e:
        log.warning("no speaker_similarity column (NaN): %s", e)
        speaker_similarities = None

    built = {}
    for name, m in judge_models.items():
        a = build_adapter(m)
        built[name] = (a, readout_site(m.readout_site, a.sites(m.sites)))

    def judges(others, pair):
        labels = corpus.labels
        others_ = [JudgeModel(name, a, site, LinearProbe().fit(corpus.judge_pooled[name][pair], labels[pair]))
                   for name, (a, site) in built.items()]
        return Judges(target, adapter, read_site, LinearProbe().fit(corpus.read_pooled[pair], labels[pair]),
                      AcousticJudge().fit_features(corpus.acoustic[pair], labels[pair]), others_, cfg.judge_level_db,
                      corpus.sr, asr, speaker_similarities, n_jobs=threads)

    return judges


def _reference(manifest, i: int, judges, wave) -> tuple[str, str]:
    """The words said: the dataset's own text where it has one (RAVDESS, CREMA-D, the demo), else the
    ASR's transcript of the original (which can itself be wrong: a loop, a hallucination)."""
    from affectlens.steering.text import transcribe

    text = manifest["text"].iloc[i] if "text" in manifest.columns else None
    if isinstance(text, str) and text.strip():
        return text.strip(), "text"
    return transcribe(judges.asr, wave), "asr"


def _judge_outputs(outputs, clip_id, original, reference, judges, cfg: SteerConfig, audio_dir: Path):
    """(numbers, transcript, file name, watermark level) per output of one clip: the original is
    judged as it is; every other output is written watermarked and what was written is read back
    and judged (all of the clip's outputs in one `judge_many`)."""
    from affectlens.naming import PRIMARY_METHOD, steered_wav_name
    from affectlens.steering.watermark import load_any, write_steered_audio

    heard, names, marks = [], [], []
    for out in outputs:
        if out.kind == "original":
            heard.append(original)
            names.append("")
            marks.append(np.nan)
            continue
        name = steered_wav_name(clip_id, PRIMARY_METHOD if out.method == "all" else out.method, out.alpha, out.seed)
        marks.append(write_steered_audio(audio_dir / name, out.wave, judges.sr, key=cfg.watermark_key,
                                         snr_db=cfg.watermark_snr_db))
        heard.append(load_any(audio_dir / name)[0])
        names.append(name)
    judged = judges.judge_many(heard, original, reference)
    return [(numbers, transcript, name, mark) for (numbers, transcript), name, mark in zip(judged, names, marks)]


def steer_music(store_path, manifest_path, model: ModelConfig, contrast: dict, cfg: SteerConfig, label_column: str,
                out_dir) -> None:
    """MusicGen: the per-artist difference of means of the steer site's pooled activations (teacher-
    forced real clips, source -> target label) added at every step of generating from
    `music_prompts`, per alpha; every piece is written (watermarked) and judged by an independent
    mood regressor and acoustic measures (steering.music)."""
    from affectlens.data.manifest import read_manifest
    from affectlens.probes.sweep import align_manifest
    from affectlens.steering.music import evaluate_music, generate_steered, summarise_music
    from affectlens.probes.axis import diff_of_means
    from affectlens.steering.watermark import write_steered_audio
    from affectlens.store import Store
    from affectlens.viz.steering import plot_music_dose_response

    src, tgt = contrast["source"], contrast["target"]
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(manifest_path)
    site = model.steer_site
    with Store(store_path) as store:
        rows = align_manifest(store.clip_ids, manifest, [label_column, "speaker"], where=str(store.path))
        X = store.pooled(site)[rows]
    labels = manifest[label_column].astype(str).to_numpy()
    groups = manifest["speaker"].astype(str).to_numpy()
    vector = diff_of_means(X, labels, groups, src, tgt)
    log.info("vector %s -> %s at %s: norm %.4g over %d groups", src, tgt, site, np.linalg.norm(vector),
             len(np.unique(groups[np.isin(labels, [src, tgt])])))
    adapter = build_adapter(model)
    prompts = list(cfg.music_prompts)
    outputs = generate_steered(adapter, prompts, site, vector, list(cfg.alphas), cfg.music_seconds,
                               seed=cfg.seed, guidance_scale=cfg.music_guidance_scale)
    sr = adapter.codec_sr
    levels = {}
    for alpha, waves in outputs.items():
        for i, w in enumerate(waves):
            levels[(i, alpha)] = write_steered_audio(out_dir / "audio" / f"prompt{i}__alpha{alpha:g}.wav", w, sr,
                                                     key=cfg.watermark_key, snr_db=cfg.watermark_snr_db)
    table = evaluate_music(outputs, sr, prompts)
    table["watermark_snr_db"] = [levels[(i, a)] for i, a in zip(table.prompt_id, table.alpha)]
    with atomic_path(out_dir / "vector.npy") as tmp:
        np.save(tmp, vector)
    write_json(out_dir / "vector.json", {"site": site, "model": adapter.model_id, "source": src, "target": tgt,
                                         "method": "diff_of_means", "groups": "speaker (artist or song)"})
    write_tsv(table, out_dir / "evaluation.tsv")
    summary = summarise_music(table)
    write_tsv(summary, out_dir / "summary.tsv")
    plot_music_dose_response(summary, out_dir / "dose_response.png",
                             title=f"{adapter.model_id} at {site}: {src} → {tgt} ({len(prompts)} prompts)")


def choose_clips(manifest: pd.DataFrame, label_column: str, label: str, n: int, seed: int) -> list[int]:
    """Row indices of `n` clips with `label`, round-robin over speakers (one per speaker first)."""
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(manifest[label_column].astype(str).to_numpy() == label)
    if len(idx) == 0:
        raise ValueError(f"no clip has {label_column} = {label!r}: nothing to steer")
    order = rng.permutation(idx)
    spk = manifest["speaker"].astype(str).to_numpy()[order]
    rank = pd.Series(spk).groupby(spk).cumcount().to_numpy()
    return order[np.lexsort((np.arange(len(order)), rank))][:n].tolist()


def _steer_sae(sae_dir, site: str, frames: list[np.ndarray]):
    """The SAE trained at the steer site and every clip's mean latents [clip, n_latents]."""
    from affectlens.sae.features import encode_array
    from affectlens.sae.registry import load_sae

    if sae_dir is None:
        raise ValueError(f"steer method sae needs an SAE at the steer site {site}: list it among the model's "
                         "sae_sites (the workflow then trains it first)")
    sae = load_sae(sae_dir)
    return sae, np.stack([encode_array(sae, f).mean(0) for f in frames])


class ClipParts:
    """What a steering run has finished, clip by clip, so that a killed or failed run resumes.

    Beside the run's output folder (`{contrast}.parts/`: Snakemake deletes an unfinished output
    folder before it reruns the job, never this one): `key.json`, a digest of every input of the
    run (the model, contrast, steer and judge settings, the size and modification time of the
    store, manifest, SAE and judge stores, and the package's source code); `audio/`, the steered
    files as they are written; and `clips/{n}.json` per finished clip, its evaluation and
    inversion-quality rows, written after its audio. A rerun with the same key skips the clips listed; any other key starts afresh. The
    tables are always read back from these files, so a resumed run writes exactly what an
    uninterrupted one does; `move_audio` hands the files to the output folder and removes the rest.
    """

    def __init__(self, path: Path, done: dict[str, Path]):
        self.path, self.done = path, done
        self.audio = path / "audio"

    @classmethod
    def open(cls, out_dir: Path, settings: dict, inputs: list) -> ClipParts:
        path = out_dir.parent / f"{out_dir.name}.parts"
        stats = [[str(p), *((Path(p).stat().st_size, Path(p).stat().st_mtime_ns) if Path(p).exists() else ())]
                 for p in inputs if p is not None]
        key = hashlib.sha256(json.dumps([settings, stats, _code_digest()], sort_keys=True,
                                        default=str).encode()).hexdigest()[:16]
        try:
            same = json.loads((path / "key.json").read_text())["key"] == key
        except (OSError, ValueError, KeyError, TypeError):
            same = False
        if path.exists() and not same:
            shutil.rmtree(path)  # another run's parts (other inputs or settings): start afresh
        (path / "clips").mkdir(parents=True, exist_ok=True)
        (path / "audio").mkdir(exist_ok=True)
        write_json(path / "key.json", {"key": key, "settings": settings, "inputs": stats}, default=str)
        parts = cls(path, {})
        for f in sorted((path / "clips").glob("*.json")):
            parts.done[json.loads(f.read_text())["clip_id"]] = f
        return parts

    def add(self, clip_id: str, records: list[dict], quality: list[dict]) -> None:
        f = self.path / "clips" / f"{len(self.done):05d}.json"
        write_json(f, {"clip_id": clip_id, "records": records, "quality": quality}, indent=None, default=_plain)
        self.done[clip_id] = f

    def tables(self, clip_ids: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(evaluation rows, inversion-quality rows) of `clip_ids`, in that order, as written."""
        missing = [c for c in clip_ids if c not in self.done]
        if missing:
            raise RuntimeError(f"steering parts in {self.path} lack clips {missing[:5]}")
        parts = [json.loads(self.done[c].read_text()) for c in clip_ids]
        return (pd.DataFrame([r for p in parts for r in p["records"]]),
                pd.DataFrame([r for p in parts for r in p["quality"]]))

    def move_audio(self, dest: Path) -> None:
        if dest.exists():
            shutil.rmtree(dest)
        self.audio.rename(dest)
        shutil.rmtree(self.path)


def _plain(value):
    """A numpy scalar as the Python number it holds (for JSON)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _code_digest() -> str:
    """A digest of the package's source files: parts made by other code are never resumed."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]
