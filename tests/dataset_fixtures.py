"""Builders of small datasets laid out exactly as the real ones are published (folder names, nested
archives, file naming, CSV headers), a loopback HTTP server with Range support, and crafted
archives. Only tests import this module."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
import threading
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import soundfile as sf


# --- audio and video ----------------------------------------------------------------------------

def tone(seconds: float, sr: int = 16000, freq: float = 220.0, amp: float = 0.3, seed: int = 0) -> np.ndarray:
    """A voiced-sounding test signal: a tone with a little noise (not silent, not clipped)."""
    t = np.arange(int(seconds * sr)) / sr
    noise = 0.07 * amp * np.random.default_rng(seed).standard_normal(len(t))
    return (amp * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def write_wav(path: Path, x: np.ndarray, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x, sr, subtype="PCM_16")
    return path


def write_media(path: Path, x: np.ndarray, sr: int = 16000, video: bool = True, fps: int = 10,
                size: tuple[int, int] = (32, 24), acodec: str = "aac", vcodec: str = "mpeg4",
                images: np.ndarray | None = None) -> Path:
    """An MP4 (or other container by suffix) with a mono audio track and, with `video`, a moving image
    (or `images`, [frame, height, width, 3] uint8, one per frame in turn)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        vs = None
        if video:
            vs = c.add_stream(vcodec, rate=fps)
            vs.width, vs.height = size
            vs.pix_fmt = "yuv420p"
        a = c.add_stream(acodec, rate=sr) if acodec else None
        if a is not None:
            a.layout = "mono"
        if vs is not None:
            for i in range(max(1, int(len(x) / sr * fps))):
                img = (np.full((size[1], size[0], 3), (40 + 20 * i) % 255, np.uint8) if images is None
                       else images[i % len(images)])
                for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(p)
            for p in vs.encode():
                c.mux(p)
        if a is not None:
            n = a.codec_context.frame_size or 1024
            for i in range(0, len(x), n):
                frame = av.AudioFrame.from_ndarray(x[None, i:i + n].astype(np.float32), format="fltp", layout="mono")
                frame.sample_rate, frame.pts = sr, i
                for p in a.encode(frame):
                    c.mux(p)
            for p in a.encode():
                c.mux(p)
    return path


def write_mp3(path: Path, x: np.ndarray, sr: int = 44100) -> Path:
    return write_media(path, x, sr, video=False, acodec="libmp3lame")


# --- archives -----------------------------------------------------------------------------------

def tar_bytes(entries: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tar_tree(root: Path, mode: str = "w:gz", arcroot: str | None = None) -> bytes:
    """A tarball of a folder (its name as the top-level entry unless `arcroot`)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        tar.add(root, arcname=arcroot if arcroot is not None else root.name)
    return buf.getvalue()


def zip_tree(root: Path, arcroot: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        base = arcroot if arcroot is not None else root.name
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            zf.write(p, f"{base}/{rel}" if base else rel)
    return buf.getvalue()


def evil_tar(kind: str) -> bytes:
    """A tar.gz with one good file and one entry that escapes: dotdot, absolute, symlink or hardlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        good = tarfile.TarInfo("data/ok.txt")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"ok"))
        if kind in ("dotdot", "absolute"):
            info = tarfile.TarInfo("data/../../evil.txt" if kind == "dotdot" else "/tmp/affectlens-evil.txt")
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        else:
            info = tarfile.TarInfo("data/link")
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = "/etc/passwd" if kind == "symlink" else "../../evil.txt"
            tar.addfile(info)
    return buf.getvalue()


def evil_zip(kind: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("data/ok.txt", "ok")
        if kind == "dotdot":
            zf.writestr("data/../../evil.txt", "evil")
        else:
            info = zipfile.ZipInfo("data/link")
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lfs_pointer(data: bytes) -> str:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256(data)}\nsize {len(data)}\n"


# --- loopback HTTP server -----------------------------------------------------------------------

@dataclass
class Server:
    url: str
    files: dict[str, bytes]
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the first cut


@contextmanager
def serve(files: dict[str, bytes]):
    """Serve `files` ({"/path": bytes}) on 127.0.0.1 with Range requests; yields a Server."""
    state = Server(url="", files=files)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            rng = self.headers.get("Range")
            with lock:
                state.requests.append((self.path, rng))
                cut = state.drop_after.pop(self.path, None)
            data = state.files.get(self.path)
            if data is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = 0
            if rng:
                start = int(rng.split("=")[1].split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if cut is not None:  # announce everything, send part, hang up: a dropped connection
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- MELD ---------------------------------------------------------------------------------------

MELD_HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season",
               "Episode", "StartTime", "EndTime"]


def meld_csv(rows: list[dict]) -> bytes:
    """A {split}_sent_emo.csv as published: UTF-8, CRLF line ends, times like 00:16:16,059."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(MELD_HEADER)
    for i, r in enumerate(rows, 1):
        w.writerow([i, r["text"], r["speaker"], r["emotion"], r["sentiment"], r["dia"], r["utt"], 3, 7,
                    r.get("start", "00:01:00,000"), r.get("end", "00:01:02,000")])
    return buf.getvalue().encode("utf-8")


def build_meld_raw(work: Path, clips: dict[str, dict[str, bytes]], tables: dict[str, bytes]) -> bytes:
    """MELD.Raw.tar.gz: MELD.Raw/{split}_sent_emo.csv and MELD.Raw/{train,dev,test}.tar.gz holding
    train_splits/, dev_splits_complete/, output_repeated_splits_test/ with dia{D}_utt{U}.mp4 clips."""
    folders = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
    outer = {}
    for split, folder in folders.items():
        outer[f"MELD.Raw/{split}.tar.gz"] = tar_bytes({f"{folder}/{name}": data
                                                       for name, data in clips.get(split, {}).items()})
        outer[f"MELD.Raw/{split}_sent_emo.csv"] = tables[split]
    return tar_bytes(outer)


# --- CREMA-D ------------------------------------------------------------------------------------

def crema_d_repo(names: list[str], audio: dict[str, bytes], sexes: dict[str, str]) -> dict[str, bytes]:
    """The repository as the two hosts serve it: /raw/... plain files (WAVs as LFS pointers) and
    /media/... the LFS objects."""
    files = {}
    listing = "\"Stimulus_Number\",\"Filename\"\n" + "".join(f"{i},\"{n}\"\n" for i, n in enumerate(names, 1))
    files["/raw/SentenceFilenames.csv"] = listing.encode()
    demo = "\"ActorID\",\"Age\",\"Sex\",\"Race\",\"Ethnicity\"\n" + "".join(
        f"{a},30,\"{s}\",\"Caucasian\",\"Not Hispanic\"\n" for a, s in sorted(sexes.items()))
    files["/raw/VideoDemographics.csv"] = demo.encode()
    for n in names:
        if n in audio:
            files[f"/raw/AudioWAV/{n}.wav"] = lfs_pointer(audio[n]).encode()
            files[f"/media/AudioWAV/{n}.wav"] = audio[n]
    return files


def wav_bytes(x: np.ndarray, sr: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, subtype="PCM_16", format="WAV")
    return buf.getvalue()


# --- PMEmo and DEAM -----------------------------------------------------------------------------

def build_pmemo(root: Path, songs: dict[int, dict], extra_meta: list[int] = ()) -> Path:
    """PMEmo2019/ with metadata.csv, chorus/{id}.mp3 and annotations/ tables as published."""
    base = root / "PMEmo2019"
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    meta = ["musicId,fileName,title,artist,album,duration,chorus_start_time,chorus_end_time"]
    static = ["musicId,Arousal(mean),Valence(mean)"]
    std = ["musicId,Arousal(std),Valence(std)"]
    dyn = ["musicId,frameTime,Arousal(mean),Valence(mean)"]
    for mid, s in songs.items():
        meta.append(f"{mid},{mid}.mp3,Song {mid},{s['artist']},Album,{s['seconds']:.2f},00:10,00:40")
        static.append(f"{mid},{s['arousal']},{s['valence']}")
        std.append(f"{mid},0.1,0.12")
        for k, (a, v) in enumerate(s.get("dynamic", [])):
            dyn.append(f"{mid},{15 + 0.5 * k:.1f},{a},{v}")
        if s.get("audio", True):
            write_mp3(base / "chorus" / f"{mid}.mp3", tone(s["seconds"], 22050, 330, seed=mid), 22050)
    for mid in extra_meta:
        meta.append(f"{mid},{mid}.mp3,Song {mid},Nobody,Album,30.00,00:10,00:40")
    (base / "metadata.csv").write_text("\n".join(meta) + "\n")
    (base / "annotations" / "static_annotations.csv").write_text("\n".join(static) + "\n")
    (base / "annotations" / "static_annotations_std.csv").write_text("\n".join(std) + "\n")
    (base / "annotations" / "dynamic_annotations.csv").write_text("\n".join(dyn) + "\n")
    return base


def build_deam(root: Path, songs: dict[int, dict]) -> tuple[Path, Path]:
    """DEAM_audio/MEMD_audio/{id}.mp3 and DEAM_Annotations/annotations/... as published (static tables
    with a space after every comma in the header, dynamic tables wide with sample_<ms>ms columns)."""
    audio = root / "DEAM_audio" / "MEMD_audio"
    ann = root / "DEAM_Annotations" / "annotations" / "annotations averaged per song"
    (ann / "song_level").mkdir(parents=True, exist_ok=True)
    (ann / "dynamic (per second annotations)").mkdir(parents=True, exist_ok=True)
    header = "song_id, valence_mean, valence_std, arousal_mean, arousal_std"
    first = [header] + [f"{sid},{s['valence']},1.1,{s['arousal']},1.2" for sid, s in songs.items() if sid <= 2000]
    second = [header + ", valence_max_mean"] + [f"{sid},{s['valence']},1.1,{s['arousal']},1.2,7"
                                                 for sid, s in songs.items() if sid > 2000]
    (ann / "song_level" / "static_annotations_averaged_songs_1_2000.csv").write_text("\n".join(first) + "\n")
    (ann / "song_level" / "static_annotations_averaged_songs_2000_2058.csv").write_text("\n".join(second) + "\n")
    n = max(len(s.get("dynamic", [])) for s in songs.values())
    cols = [f"sample_{15000 + 500 * k}ms" for k in range(n)]
    for which, idx in (("arousal", 0), ("valence", 1)):
        lines = [",".join(["song_id"] + cols)]
        for sid, s in songs.items():
            vals = [f"{d[idx]}" for d in s.get("dynamic", [])]
            lines.append(",".join([str(sid)] + vals + [""] * (n - len(vals))))
        (ann / "dynamic (per second annotations)" / f"{which}.csv").write_text("\n".join(lines) + "\n")
    for sid, s in songs.items():
        if s.get("audio", True):
            write_mp3(audio / f"{sid}.mp3", tone(s["seconds"], 22050, 262, seed=sid), 22050)
    return root / "DEAM_audio", root / "DEAM_Annotations"


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def truncate(data: bytes, fraction: float = 0.6) -> bytes:
    return data[: int(len(data) * fraction)]

