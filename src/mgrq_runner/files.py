"""What runs write: files replaced atomically (a crash mid-write keeps the previous one), tensors as CPU copies."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

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
