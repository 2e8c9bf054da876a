"""Data layer: espeak synthesis, the demo corpus, the manifest schema, decoding."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from affectlens.data.decode import _read_audioread, _read_soundfile, decode_clip, decode_manifest
from affectlens.data.demo import (DEFAULT_SENTENCES, build_demo_corpus, clip_prosody, emotion_preset,
                                  render_clip)
from affectlens.data.espeak import synthesize
from affectlens.data.manifest import (MANIFEST_COLUMNS, ManifestError, read_manifest, read_rejections,
                                      write_manifest, write_rejections)

VOICES = ["en-us+m3", "en-us+f2"]
SENTENCES = list(DEFAULT_SENTENCES[:2])


def _median_f0(x: np.ndarray, sr: int, fmin: float = 60.0, fmax: float = 500.0) -> float:
    """Median autocorrelation pitch over the loud (voiced) frames; plain numpy, no JIT warm-up."""
    frame, hop = int(0.04 * sr), int(0.01 * sr)
    frames = np.lib.stride_tricks.sliding_window_view(x, frame)[::hop]
    frames = frames - frames.mean(1, keepdims=True)
    energy = (frames ** 2).sum(1)
    frames = frames[energy > 0.1 * energy.max()]
    ac = np.fft.irfft(np.abs(np.fft.rfft(frames * np.hanning(frame), n=2 * frame)) ** 2)[:, :frame]
    lo, hi = int(sr / fmax), int(sr / fmin)
    return float(np.median(sr / (lo + ac[:, lo:hi].argmax(1))))


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x ** 2)))


# --- espeak ---------------------------------------------------------------------------------------

def test_synthesize_is_deterministic_and_sane():
    a, sr = synthesize(SENTENCES[0], voice="en-us+f2")  # breathy: uses espeak's noise generator
    synthesize("Something else in between.", voice="en-us+m3", rate=300, pitch=90)  # must not leak state
    time.sleep(1.05)  # espeak seeds its noise from the clock in seconds
    b, _ = synthesize(SENTENCES[0], voice="en-us+f2")
    assert a.dtype == np.float32 and a.ndim == 1
    assert np.array_equal(a, b)
    assert 1.0 < len(a) / sr < 4.0
    assert 0.01 < _rms(a) and np.abs(a).max() <= 1.0


def test_synthesize_names_the_bad_voice_or_parameter():
    with pytest.raises(ValueError, match="xx-nope"):
        synthesize("hello", voice="xx-nope")
    with pytest.raises(ValueError, match="rate=20"):
        synthesize("hello", rate=20)


# --- demo corpus ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    df = build_demo_corpus(out, speakers=VOICES, sentences=SENTENCES, emotions=["happy", "sad"], seed=0,
                           progress=False)
    return out, df


def test_corpus_files_and_manifest(corpus, tmp_path):
    out, df = corpus
    assert list(df.columns[:len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert len(df) == 2 * 2 * 2 and df["clip_id"].is_unique
    assert set(df["speaker"]) == {"spk1", "spk2"} and set(df["split"]) == {"all"}
    for row in df.itertuples():
        info = sf.info(row.path)
        assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "FLAC")
        assert row.path.startswith(str(out / row.speaker))
        assert abs(info.duration - row.duration) < 1e-3 and 0.8 < row.duration < 4.0
    # every pair_key has every emotion: counterfactual pairs exist
    assert (df.groupby("pair_key")["label"].apply(frozenset) == frozenset({"happy", "sad"})).all()
    assert df.groupby("pair_key")["speaker"].nunique().eq(1).all()
    assert df.groupby("pair_key")["text"].nunique().eq(1).all()
    path = write_manifest(df, tmp_path / "m.tsv")
    back = read_manifest(path)
    pd.testing.assert_frame_equal(back[list(MANIFEST_COLUMNS)], df[list(MANIFEST_COLUMNS)], check_dtype=False)


def test_corpus_cues_differ_by_class(corpus):
    _, df = corpus
    feats = {}
    for row in df.itertuples():
        x, sr = sf.read(row.path, dtype="float32")
        feats[row.clip_id] = (_median_f0(x, sr), _rms(x), row.duration)
    for key in df["pair_key"].unique():
        happy, sad = feats[f"{key}_happy"], feats[f"{key}_sad"]
        assert happy[0] > 1.2 * sad[0], (key, happy, sad)  # higher pitch
        assert happy[1] > 1.5 * sad[1], (key, happy, sad)  # louder
        assert happy[2] < 0.85 * sad[2], (key, happy, sad)  # faster


def test_angry_is_louder_and_faster_than_sad():
    voice, text = VOICES[0], SENTENCES[1]
    angry = render_clip(text, voice, clip_prosody(voice, 1, "angry", seed=0))
    sad = render_clip(text, voice, clip_prosody(voice, 1, "sad", seed=0))
    assert _rms(angry) > 2 * _rms(sad)
    assert len(angry) < 0.8 * len(sad)
    assert np.abs(angry).max() < 0.99  # loud, but not clipped


def test_clip_is_independent_of_the_grid_around_it(corpus, tmp_path):
    _, df = corpus
    alone = build_demo_corpus(tmp_path, speakers=[VOICES[1]], sentences=SENTENCES[:1], emotions=["sad"],
                              seed=0, progress=False)
    a, _ = sf.read(alone["path"][0], dtype="int16")
    b, _ = sf.read(df.set_index("clip_id").loc["spk2_s01_sad", "path"], dtype="int16")
    assert np.array_equal(a, b)
    # cues are jittered per clip, not one exact setting per class
    cues = {clip_prosody(v, i, "happy", 0) for v in VOICES for i in range(4)}
    assert len({c.rate for c in cues}) == len(cues)


def test_unknown_emotion_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="known emotions.*angry.*calm"):
        build_demo_corpus(tmp_path, speakers=VOICES, sentences=SENTENCES, emotions=["happy", "elated"])
    assert emotion_preset("surprised").pitch_range > emotion_preset("sad").pitch_range


# --- manifest -------------------------------------------------------------------------------------

def _manifest(n=3) -> pd.DataFrame:
    return pd.DataFrame({
        "clip_id": [f"c{i}" for i in range(n)], "dataset": "toy", "path": [f"a/{i}.wav" for i in range(n)],
        "split": "all", "label": ["happy ", " sad", "happy"][:n], "speaker": "s1", "pair_key": None,
        "text": "", "start": np.nan, "end": np.nan, "duration": 1.0, "valence": 0.5,
    })


def test_manifest_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "bad.tsv"
    _manifest().drop(columns=["speaker", "pair_key"]).to_csv(path, sep="\t", index=False)
    with pytest.raises(ManifestError, match=r"bad\.tsv.*'speaker', 'pair_key'"):
        read_manifest(path)


def test_manifest_duplicate_ids_are_named(tmp_path):
    df = _manifest()
    df.loc[2, "clip_id"] = "c1"
    with pytest.raises(ManifestError, match=r"dup\.tsv.*not unique.*'c1'"):
        write_manifest(df, tmp_path / "dup.tsv")
    assert not (tmp_path / "dup.tsv").exists()


def test_manifest_roundtrip_strips_labels_and_keeps_extras(tmp_path):
    back = read_manifest(write_manifest(_manifest(), tmp_path / "ok.tsv"))
    assert back["label"].tolist() == ["happy", "sad", "happy"]
    assert back["pair_key"].isna().all() and back["valence"].tolist() == [0.5] * 3
    assert list(tmp_path.iterdir()) == [tmp_path / "ok.tsv"]  # no temp files left behind


def test_rejections_file_has_header_even_when_empty(tmp_path):
    write_rejections([], tmp_path / "r.tsv")
    assert list(read_rejections(tmp_path / "r.tsv").columns) == ["clip_id", "path", "reason"]


# --- decode ---------------------------------------------------------------------------------------

def test_decode_clip_mixes_down_resamples_and_slices(tmp_path):
    t = np.arange(44100 * 2) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 220 * t)], 1) * 0.5
    sf.write(tmp_path / "s.wav", stereo, 44100)
    x = decode_clip(tmp_path / "s.wav")
    assert x.ndim == 1 and abs(len(x) - 32000) <= 1 and abs(_rms(x) - 0.5 / np.sqrt(2)) < 0.01
    part = decode_clip(tmp_path / "s.wav", start=0.5, end=1.25)
    assert abs(len(part) - 12000) <= 1


def test_audioread_fallback_matches_soundfile(tmp_path):
    stereo = (0.3 * np.random.default_rng(0).standard_normal((22050, 2))).astype(np.float32)
    sf.write(tmp_path / "s.wav", stereo, 22050, subtype="PCM_16")
    for start, end in [(None, None), (0.25, 0.75)]:
        a, sr_a = _read_audioread(tmp_path / "s.wav", start, end)
        b, sr_b = _read_soundfile(tmp_path / "s.wav", start, end)
        assert sr_a == sr_b and np.array_equal(a, b)


def test_decode_manifest_rejects_bad_clips_with_reasons(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    sf.write(src / "good.wav", (0.1 * rng.standard_normal(22050)).astype(np.float32), 22050)
    sf.write(src / "silent.wav", np.zeros(16000, np.float32), 16000)
    (src / "empty.wav").write_bytes(b"")
    (src / "text.wav").write_text("this is not audio at all\n" * 20)
    nan = 0.1 * rng.standard_normal(16000).astype(np.float32)
    nan[100] = np.nan
    sf.write(src / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(src / "short.wav", 0.1 * rng.standard_normal(800).astype(np.float32), 16000)
    names = ["good", "silent", "empty", "text", "nan", "short"]
    df = _manifest(1).iloc[[0] * len(names)].reset_index(drop=True)
    df["clip_id"] = names
    df["path"] = [f"src/{n}.wav" for n in names]
    decoded, rejected = decode_manifest(df, tmp_path / "out", root=tmp_path, progress=False, n_jobs=2)
    assert decoded["clip_id"].tolist() == ["good"]
    good = decoded.iloc[0]
    assert sf.info(good["path"]).samplerate == 16000 and abs(good["duration"] - 1.0) < 1e-3
    assert good["source_path"] == "src/good.wav"
    reasons = {r["clip_id"]: r["reason"] for r in rejected}
    assert set(reasons) == set(names) - {"good"}
    assert reasons["silent"].startswith("silent")
    assert "empty file" in reasons["empty"]
    assert "text.wav" in reasons["text"] and "not decodable" in reasons["text"]
    assert "NaN" in reasons["nan"]
    assert reasons["short"].startswith("too short")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.flac"]


def test_quiet_speech_between_pauses_is_not_silent_but_a_faint_hum_is():
    """Silence is judged on the loudest 50 ms, not the clip's mean: a 0.2 s word at RMS 3e-3 inside
    3 s of pause has a mean RMS of 7.7e-4, below the 1e-3 threshold, yet it is speech (real RAVDESS
    calm/sad takes look like this); noise whose loudest moment is ~5e-4 stays silent."""
    from affectlens.data.decode import SILENCE_RMS, check_clip

    sr = 16000
    rng = np.random.default_rng(0)
    quiet = np.zeros(3 * sr, np.float32)
    quiet[sr: sr + sr // 5] = 3e-3 * np.sqrt(2) * np.sin(2 * np.pi * 200 * np.arange(sr // 5) / sr)
    assert np.sqrt(np.mean(quiet.astype(np.float64) ** 2)) < SILENCE_RMS
    assert check_clip(quiet, sr, 0.1, 30.0) is None
    hum = (5e-4 * rng.standard_normal(3 * sr)).astype(np.float32)
    assert check_clip(hum, sr, 0.1, 30.0).startswith("silent: loudest 50 ms has RMS")
