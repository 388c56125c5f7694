"""Loading reward weights: hub ids, local folders and files, URLs, or modules already built.

Every reward takes its model as one of:

- a module already built (tests and notebooks pass tiny random ones);
- a hub id or a local folder, loaded with the transformers class's ``from_pretrained``;
- for bare state dicts (the LAION aesthetic MLP, HPSv2), a local ``.safetensors`` / ``.pt`` /
  ``.pth`` file, an ``https://`` URL, or a hub repo id plus a file name. ``.pt``/``.pth`` files are
  read with ``torch.load(weights_only=True)``, which refuses to run pickled code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from visalign.errors import CheckpointError

__all__ = ["resolve_file", "load_state_dict", "from_pretrained"]


def resolve_file(source: str | os.PathLike, filename: str | None = None) -> Path:
    """Turns a local path, an ``https://`` URL or a hub repo id (+ ``filename``) into a local file.

    Args:
        source: a local file, a local folder (with ``filename``), a URL, or ``"owner/repo"``.
        filename: the file inside a folder or hub repo.

    Raises:
        CheckpointError: nothing could be found or downloaded.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if filename and (path / filename).is_file():
            return path / filename
        raise CheckpointError(f"folder {path} has no file {filename!r}; pass the file's path.")
    if text.startswith(("http://", "https://")):
        target = Path(torch.hub.get_dir()) / "visalign" / text.rstrip("/").split("/")[-1]
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(text, str(target), progress=False)
            except Exception as exc:
                raise CheckpointError(
                    f"could not download {text}: {exc}. Download the file yourself and pass its local path."
                ) from exc
        return target
    if filename is None:
        raise CheckpointError(
            f"{text!r} is not a local file or folder; to load from the Hugging Face hub pass the "
            "repo id together with the file name."
        )
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=text, filename=filename))
    except Exception as exc:
        raise CheckpointError(
            f"could not find {filename!r} in hub repo {text!r} ({type(exc).__name__}: {exc}). "
            "Pass a local path to the file instead."
        ) from exc


def load_state_dict(source: Any, filename: str | None = None) -> dict[str, torch.Tensor]:
    """Loads a state dict from a mapping, a ``.safetensors`` file or a ``.pt``/``.pth`` file.

    ``torch.load`` runs with ``weights_only=True``. A checkpoint holding ``{"state_dict": ...}`` is
    unwrapped, and a ``module.`` prefix (from DataParallel) is stripped.
    """
    if isinstance(source, Mapping):
        sd = dict(source)
    else:
        path = resolve_file(source, filename)
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                sd = load_file(str(path))
            else:
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"could not read weights from {path}: {exc}") from exc
    if isinstance(sd.get("state_dict"), Mapping):
        sd = dict(sd["state_dict"])
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def from_pretrained(cls: Any, source: Any, *, what: str, torch_dtype: torch.dtype | None = None, **kwargs) -> Any:
    """``cls.from_pretrained(source)`` with visalign's error message; modules pass through."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    if torch_dtype is not None:
        kwargs[_dtype_kwarg()] = torch_dtype
    try:
        return cls.from_pretrained(os.fspath(source), **kwargs)
    except Exception as exc:
        raise CheckpointError(
            f"could not load the {what} from {os.fspath(source)!r} with "
            f"{getattr(cls, '__name__', cls)}.from_pretrained ({type(exc).__name__}: {exc}). Pass "
            "a hub id, a local folder saved with save_pretrained, or a model already built."
        ) from exc


def _dtype_kwarg() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` since transformers 4.56, before that
    ``torch_dtype``.
    """
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
