"""Offline preference pairs: checking a pairs file and loading the VAE latents of its images.

A pairs file (CSV/JSONL) has a ``prompt`` and two image paths per row (``chosen``, ``rejected`` by
default; relative paths are taken from the file's folder). :func:`check_pairs` validates it before
any model work; :class:`PairLatents` encodes the images with the policy's VAE (the posterior's mode),
caching the latents on disk as safetensors when asked (keyed by file, size and VAE).
"""

from __future__ import annotations

import contextlib
import hashlib
import os

import torch

from visalign.errors import InvalidInputError

__all__ = ["PairLatents", "check_pairs", "resolve_path"]


def resolve_path(source, value) -> str:
    """A path from a pairs file, relative paths taken from the file's folder."""
    base = source.base_dir
    return str(value) if os.path.isabs(str(value)) or base is None else os.path.join(base, str(value))


def check_pairs(source, chosen_column: str = "chosen", rejected_column: str = "rejected") -> None:
    """Raises :class:`InvalidInputError` listing pairs with a missing column, a missing file, or the
    same file as chosen and rejected.
    """
    problems = []
    for i, record in enumerate(source):
        where = f"pair {i} (prompt {record['prompt']!r})"
        missing = [c for c in (chosen_column, rejected_column) if not record.get(c)]
        if missing:
            problems.append(f"{where} has no {' / '.join(missing)} column")
            continue
        chosen, rejected = resolve_path(source, record[chosen_column]), resolve_path(source, record[rejected_column])
        for name, path in ((chosen_column, chosen), (rejected_column, rejected)):
            if not os.path.isfile(path):
                problems.append(f"{where}: {name} image '{path}' does not exist")
        if os.path.abspath(chosen) == os.path.abspath(rejected):
            problems.append(f"{where}: chosen and rejected are the same file '{chosen}'")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise InvalidInputError(
            f"{source.origin}: {len(problems)} bad pair(s): "
            + "; ".join(problems[:5])
            + more
            + f". Each pair needs two different, existing image files in columns '{chosen_column}' and "
            f"'{rejected_column}' (relative to the pairs file's folder)."
        )


class PairLatents:
    """The VAE latents of the chosen and rejected images of offline pairs, cached when configured.

    Args:
        policy: the policy whose VAE encodes the images.
        source: the pairs' :class:`~visalign.training.prompts.PromptSource` (for relative paths).
        geometry: the training size; images are resized to it.
        device: where the latents go.
        cache_dir: a folder for cached latents (safetensors), or None.
        columns: the chosen and rejected image columns.
        autocast: a context manager for the VAE's forward (the trainer's mixed precision).
    """

    def __init__(
        self,
        policy,
        source,
        geometry,
        device,
        cache_dir: str | None = None,
        columns: tuple[str, str] = ("chosen", "rejected"),
        autocast=contextlib.nullcontext,
    ):
        self.policy, self.source, self.geometry, self.device = policy, source, geometry, device
        self.cache_dir, self.columns, self.autocast = cache_dir, columns, autocast
        self._fingerprint: str | None = None

    def cache_path(self, path: str) -> str:
        """Where the latents of image ``path`` are cached: a hash of the file, its size and the VAE."""
        if self._fingerprint is None:
            self._fingerprint = self.policy.vae_fingerprint()
        st, g = os.stat(path), self.geometry
        key = (
            f"{os.path.abspath(path)}|{st.st_mtime_ns}|{st.st_size}|{self.policy.family}|"
            f"{g.height}x{g.width}|{self._fingerprint}"
        )
        return os.path.join(self.cache_dir, hashlib.sha1(key.encode()).hexdigest() + ".safetensors")

    @torch.no_grad()
    def load(self, records: list[dict], need_pixels: bool = False):
        """Latents of the pairs in ``records``: ``(x0_w, x0_l, pixels_w, pixels_l)``.

        The pixels are loaded when ``need_pixels`` (RWR scores them) or when a latent is not cached;
        otherwise they are None.

        Raises:
            InvalidInputError: a pair whose chosen and rejected images are the same image.
        """
        from safetensors.torch import load_file, save_file

        from visalign.training.prompts import load_images

        out = []
        for column in self.columns:
            paths = [resolve_path(self.source, r[column]) for r in records]
            cache = [self.cache_path(p) for p in paths] if self.cache_dir else None
            cached = cache is not None and all(os.path.exists(c) for c in cache)
            pixels = None
            if need_pixels or not cached:
                pixels = load_images(
                    [{"prompt": r["prompt"], column: p} for r, p in zip(records, paths)],
                    column,
                    size=(self.geometry.height, self.geometry.width),
                ).to(self.device)
            if cached:
                latents = torch.stack([load_file(c, device=str(self.device))["latents"] for c in cache])
            else:
                with self.autocast():
                    latents = self.policy.encode(pixels).float()
                if cache is not None:
                    os.makedirs(self.cache_dir, exist_ok=True)
                    for c, z in zip(cache, latents):
                        tmp = f"{c}.tmp-{os.getpid()}"
                        save_file({"latents": z.cpu().contiguous()}, tmp)
                        os.replace(tmp, c)  # atomic: a reader never sees a partial file
            out.append((latents, pixels))
        (x0_w, pix_w), (x0_l, pix_l) = out
        same = (x0_w - x0_l).flatten(1).abs().amax(1) == 0
        if bool(same.any()):
            i = int(same.nonzero()[0])
            chosen, rejected = self.columns
            raise InvalidInputError(
                f"Pair with prompt {records[i]['prompt']!r}: chosen '{records[i][chosen]}' and "
                f"rejected '{records[i][rejected]}' are the same image. A pair must differ."
            )
        return x0_w, x0_l, pix_w, pix_l
