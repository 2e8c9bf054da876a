"""Steering music generation (MusicGen) and judging the result without the steered model.

The steering vector is found where the model reads music: the decoder site's pooled activations
while teacher-forcing real clips of the two moods (per-artist difference of means, as for
speakers). It is added at that site at every step of `generate()`, with the same sampling seed for
every alpha, so alpha = 0 reproduces the unsteered generation exactly and every other alpha
differs from it only by the vector.

The judge is independent of MusicGen: vibenet (an EfficientNet regressor of valence, energy,
danceability, ... on mel spectrograms, trained on other data; `pip install --no-deps vibenet`,
see pyproject's `music` extra), plus plain acoustic measures (active level, spectral centroid,
onset rate, tempo) and how far each steered piece moved from the unsteered one (log-mel L1).
"""

from __future__ import annotations

import logging
import warnings
from functools import lru_cache

import numpy as np
import pandas as pd
import soxr

from affectlens.steering.inversion import MelConfig, log_mel, mel_distances
from affectlens.steering.vectors import add_vector

log = logging.getLogger("affectlens")
MOOD_SR = 16000  # vibenet's input rate
MOOD_COLUMNS = ("valence", "energy", "danceability", "acousticness", "instrumentalness", "liveness", "speechiness")


@lru_cache(maxsize=1)
def _mood_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydub warns that ffmpeg is absent; vibenet gets arrays, not files
        from vibenet import load_model

        return load_model()


def mood(waves: list[np.ndarray], sr: int) -> pd.DataFrame:
    """vibenet's valence, energy, ... in [0, 1] per wave (rows in order). Without vibenet
    installed, the columns are NaN and a warning says how to install it."""
    try:
        model = _mood_model()
    except ImportError as e:
        log.warning("no music mood judge (%s): pip install --no-deps vibenet==0.1.0 onnxruntime audioread pydub", e)
        return pd.DataFrame(np.nan, index=range(len(waves)), columns=list(MOOD_COLUMNS))
    rows = []
    for w in waves:
        w16 = soxr.resample(np.asarray(w, dtype=np.float32), sr, MOOD_SR) if sr != MOOD_SR else w
        rows.append(model.predict([np.asarray(w16, dtype=np.float32)], sr=MOOD_SR)[0].to_dict())
    return pd.DataFrame(rows, columns=list(MOOD_COLUMNS))


def music_acoustics(wave: np.ndarray, sr: int) -> dict[str, float]:
    """Level of the active frames (dB), spectral centroid (Hz), onsets per second and tempo (BPM)."""
    import librosa

    w = np.asarray(wave, dtype=np.float32)
    rms = librosa.feature.rms(y=w, frame_length=2048, hop_length=512)[0]
    db = 20 * np.log10(np.maximum(rms, 1e-8))
    active = db > db.max() - 40
    onset_env = librosa.onset.onset_strength(y=w, sr=sr)
    onsets = librosa.onset.onset_detect(onset_envelope=onset_env, sr=sr)
    tempo = librosa.feature.tempo(onset_envelope=onset_env, sr=sr)
    return {"active_rms_db": float(db[active].mean()),
            "spectral_centroid_hz": float(librosa.feature.spectral_centroid(y=w, sr=sr).mean()),
            "onset_rate": float(len(onsets) / (len(w) / sr)), "tempo_bpm": float(np.atleast_1d(tempo)[0])}


def generate_steered(adapter, prompts: list[str], site: str, vector: np.ndarray, alphas, seconds: float,
                     seed: int = 0, **generate_kwargs) -> dict[float, list[np.ndarray]]:
    """{alpha: [mono wave per prompt]} at the codec's rate: one sampled generation per alpha with
    `vector` * alpha added at `site` at every step, the sampling seed reset for each alpha."""
    import torch

    if not site.startswith(("decoder.", "text.")):
        raise ValueError(f"steer_site {site!r}: MusicGen is steered at a decoder.* (or text.*) site")
    steps = max(1, int(round(seconds * adapter.frame_rate)))
    out = {}
    for alpha in alphas:
        torch.manual_seed(seed)
        audio = adapter.generate(prompts, {site: add_vector(vector, float(alpha))}, max_new_tokens=steps,
                                 do_sample=True, **generate_kwargs)
        out[float(alpha)] = [a.float().mean(0).cpu().numpy() for a in audio]
    return out


def evaluate_music(outputs: dict[float, list[np.ndarray]], sr: int, prompts: list[str]) -> pd.DataFrame:
    """One row per prompt x alpha: the mood judge, the acoustic measures, and the log-mel distance
    to the lowest alpha's piece for the same prompt (the unsteered one when alpha 0 is swept)."""
    base_alpha = min(outputs)
    cfg = MelConfig(sr=sr, hop_length=sr // 100)
    base_mels = [log_mel(w, cfg) for w in outputs[base_alpha]]
    rows = []
    for alpha, waves in sorted(outputs.items()):
        judged = mood(waves, sr)
        for i, w in enumerate(waves):
            rows.append({"prompt_id": i, "prompt": prompts[i], "alpha": alpha, **judged.iloc[i].to_dict(),
                         **music_acoustics(w, sr),
                         "log_mel_l1_to_base": mel_distances(base_mels[i], log_mel(w, cfg))["log_mel_l1"]})
    return pd.DataFrame(rows)


def summarise_music(table: pd.DataFrame) -> pd.DataFrame:
    """Per alpha: means over prompts, and the mean paired change against the lowest alpha with its
    95% interval over prompts (t), for valence, energy, level and tempo."""
    from scipy import stats

    base = table[table.alpha == table.alpha.min()].set_index("prompt_id")
    rows = []
    for alpha, g in table.groupby("alpha"):
        g = g.set_index("prompt_id")
        row = {"alpha": alpha, "n_prompts": len(g)}
        for col in ("valence", "energy", "danceability", "active_rms_db", "spectral_centroid_hz", "onset_rate",
                    "tempo_bpm", "log_mel_l1_to_base"):
            row[col] = float(g[col].mean())
        for col in ("valence", "energy", "active_rms_db", "tempo_bpm"):
            d = (g[col] - base.loc[g.index, col]).to_numpy(dtype=float)
            row[f"{col}_change"] = float(np.mean(d))
            half = (stats.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / np.sqrt(len(d))
                    if len(d) > 1 and np.isfinite(d).all() else np.nan)
            row[f"{col}_change_ci95"] = float(half)
        rows.append(row)
    return pd.DataFrame(rows)
