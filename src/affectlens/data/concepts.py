"""The clips of a concept folder (`concepts.<name>.with_concept` / `without_concept` in the config,
`affectlens concept --with / --without`): its audio files, and which of them belong together.

Light on purpose (no torch): the workflow lists these files as the concept rule's inputs while it
plans the jobs, so that adding, removing or replacing a recording reruns the concept.
"""

from __future__ import annotations

from pathlib import Path

from affectlens.data.annotations import walk

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac")
GROUP_BY = ("subfolder", "file")


def audio_files(folder: str | Path, key: str = "concept folder") -> list[Path]:
    """Every audio file under `folder` (sub-folders and linked folders included, each real folder
    once), sorted. FileNotFoundError naming `key` when the folder is missing or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{key}: folder {folder} does not exist (relative paths are from the working "
                                f"directory, {Path.cwd()}); give the folder of recordings")
    files = sorted(d / f for d, _, names in walk(folder) for f in names
                   if Path(f).suffix.lower() in AUDIO_EXTENSIONS and (d / f).is_file())
    if not files:
        raise FileNotFoundError(f"{key}: {folder} holds no audio files ({', '.join(AUDIO_EXTENSIONS)}); put the "
                                "recordings there, in sub-folders per speaker if you know them")
    return files


def concept_clips(folder: str | Path, group_by: str = "subfolder",
                  key: str = "concept folder") -> tuple[list[Path], list[str]]:
    """(the audio files under `folder`, their groups). `subfolder`: a clip's first folder below
    `folder` (with/Actor_01/x.flac -> Actor_01; the same name under the other folder is the same
    speaker), a clip directly in `folder` its own group; `file`: every clip its own group."""
    if group_by not in GROUP_BY:
        raise ValueError(f"{key}: group_by {group_by!r}: choose one of {GROUP_BY}")
    files = audio_files(folder, key)
    groups = []
    for f in files:
        parts = f.relative_to(folder).parts
        groups.append(parts[0] if group_by == "subfolder" and len(parts) > 1 else f"file:{f}")
    return files, groups
