"""The responsibility marks on steered audio: metadata label + a watermark that survives MP3/Opus."""

import numpy as np
import pytest
import soundfile as sf
import soxr

from affectlens.data.espeak import synthesize
from affectlens.steering import watermark as wm

SR = 16000
CLIPS = [("The meeting starts at nine tomorrow.", "en-us"), ("I never said she stole my money.", "en-us+f2"),
         ("Kids are talking by the door.", "en-us+m3")]


@pytest.fixture(scope="module")
def clips():
    out = []
    for text, voice in CLIPS:
        w, sr = synthesize(text, voice=voice)
        out.append(soxr.resample(w, sr, SR).astype(np.float32))
    return out


def test_null_threshold_is_a_stated_false_alarm_rate():
    assert wm.false_alarm_probability() < 1e-4
    assert wm.false_alarm_probability(4.0) > 0.2  # 4 sigma over 8192 lags is no evidence at all


def test_no_false_alarm_on_originals_and_their_encodings(clips, tmp_path):
    for i, w in enumerate(clips):
        assert not wm.detect(w, SR).detected
        for codec, suffix in (("mp3", "mp3"), ("opus", "ogg")):
            d, sr = wm.load_any(wm.encode(w, SR, tmp_path / f"o{i}.{suffix}", codec))
            assert not wm.detect(d, sr).detected
    null = wm.null_scores(clips[0], SR, n_keys=40)
    assert null.max() < wm.THRESHOLD and 3.0 < np.median(null) < 5.0  # max of 8192 N(0,1) ~ 4


def test_watermark_is_quiet_and_survives_mp3_and_opus(clips, tmp_path):
    for i, w in enumerate(clips):
        m = wm.embed(w, SR)
        assert abs(wm.snr_db(w, m) - wm.DEFAULT_SNR_DB) < 0.5 and wm.DEFAULT_SNR_DB >= 20
        assert wm.detect(m, SR).score > 2 * wm.THRESHOLD
        assert not wm.detect(m, SR, key="someone else").detected
        for codec, suffix, bitrate in (("mp3", "mp3", 32000), ("opus", "ogg", 24000)):
            d, sr = wm.load_any(wm.encode(m, SR, tmp_path / f"m{i}.{suffix}", codec, bitrate=bitrate))
            det = wm.detect(d, sr)
            assert det.detected, (codec, det)


def test_each_clip_gets_the_quietest_level_that_survives_opus(clips, tmp_path):
    """A longer clip carries more blocks of the mark, so it can take a quieter one; each chosen
    level is the first (from quiet to loud) whose Opus 16 kbit/s copy scores >= 2x the threshold."""
    short = clips[0][: SR * 3 // 2]
    long = np.concatenate(clips)
    chosen = {name: wm.embed_quietest(w, SR) for name, w in (("short", short), ("long", long))}
    for name, w in (("short", short), ("long", long)):
        c = chosen[name]
        assert c.margin_met and c.score >= wm.MARGIN * wm.THRESHOLD
        assert abs(wm.snr_db(w, c.wave) - c.snr_db) < 0.5
        d, sr = wm.load_any(wm.encode(c.wave, SR, tmp_path / f"{name}.ogg", "opus", bitrate=16000))
        assert wm.detect(d, sr).detected
        quieter = [lv for lv in wm.LEVELS_DB if lv > c.snr_db]
        if quieter:  # the next quieter level misses the margin on this clip
            q = wm.embed(w, SR, snr_db=min(quieter))
            d, sr = wm.load_any(wm.encode(q, SR, tmp_path / f"{name}_q.ogg", "opus", bitrate=16000))
            assert wm.detect(d, sr).score < wm.MARGIN * wm.THRESHOLD
    assert chosen["long"].snr_db > chosen["short"].snr_db
    with pytest.raises(ValueError, match="'auto'"):
        wm.write_steered_audio(tmp_path / "x.wav", short, SR, snr_db="loud")


def test_detection_is_blind_to_cropping_and_other_sample_rates(clips):
    m = wm.embed(clips[1], SR)
    assert wm.detect(m[3001:], SR).detected
    m44 = wm.embed(soxr.resample(clips[1], SR, 44100), 44100)
    assert wm.detect(m44, 44100).detected


def test_write_steered_audio_labels_and_marks(clips, tmp_path):
    for suffix in ("wav", "flac"):
        p = tmp_path / f"steered.{suffix}"
        level = wm.write_steered_audio(p, clips[0], SR)
        assert level in wm.LEVELS_DB
        assert wm.read_label(p) == wm.LABEL
        assert sf.info(str(p)).samplerate == SR
        det, label = wm.check_file(p)
        assert det.detected and label == wm.LABEL
    if True:  # the label also rides along in an MP3 made from it, when the encoder is told
        d, _ = wm.load_any(tmp_path / "steered.wav")
        p = wm.encode(d, SR, tmp_path / "steered.mp3", "mp3", label=wm.LABEL)
        assert wm.read_label(p) == wm.LABEL
    plain = tmp_path / "plain.wav"
    sf.write(plain, clips[0], SR)
    det, label = wm.check_file(plain)
    assert not det.detected and label is None
    with pytest.raises(ValueError, match="use .wav or .flac"):
        wm.write_steered_audio(tmp_path / "x.mp3", clips[0], SR)


def test_cli_watermark_check_exit_codes(clips, tmp_path, capsys):
    from affectlens.cli import main

    p = tmp_path / "s.wav"
    wm.write_steered_audio(p, clips[2], SR, snr_db=25)
    assert main(["watermark", "check", str(p)]) == 0
    assert "watermark detected" in capsys.readouterr().out
    plain = tmp_path / "plain.wav"
    sf.write(plain, clips[2], SR)
    assert main(["watermark", "check", str(plain)]) == 1
    assert "no watermark" in capsys.readouterr().out
    assert main(["watermark", "check", str(tmp_path / "missing.wav")]) == 2
