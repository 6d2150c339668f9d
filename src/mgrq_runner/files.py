"""What runs write: files replaced atomically (a crash mid-write keeps the previous one), tensors as CPU copies,
and the checksums that tie a run dir's files to its records. No torch import: the collector uses it too."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Calls ``write`` on a temporary name next to ``path``, then moves the result onto ``path``.

    The temporary name is unique (process id and a random part), so two writers never share one.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU copy (what safetensors stores)."""
    return tensor.detach().to("cpu", copy=True).contiguous()


def file_sha256(path: Path) -> str:
    """The file's SHA-256, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
