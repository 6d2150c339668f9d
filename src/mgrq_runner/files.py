"""What runs write: files replaced atomically (a crash mid-write keeps the previous one), tensors as CPU copies,
and the checksums that tie a run dir's files to its records. No torch import: the collector uses it too."""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mgrq_runner.errors import DataError, DiskFullError

if TYPE_CHECKING:
    import torch

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Calls ``write`` on a temporary name next to ``path``, then moves the result onto ``path``.

    The temporary name is unique (process id and a random part), so two writers never share one. ``path`` itself
    is replaced, never written through: a symbolic link there is replaced by the file, its target left alone. A
    full disk is a ``DiskFullError`` naming the file; the previous file stays as it was.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as err:
        if not no_space(err):
            raise
        raise DiskFullError(
            f"no space left to write {path}; what the run wrote before is kept. Fix: free disk "
            "space (or write the run elsewhere with hydra.run.dir=), then rerun with resume=true."
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def no_space(err: BaseException) -> bool:
    """Whether ``err`` says the disk (or quota) is full: an OSError, or a library's wrapped one (safetensors says
    "No space left on device (os error 28)")."""
    if isinstance(err, OSError):
        return err.errno in NO_SPACE
    return any(os.strerror(code) in str(err) for code in NO_SPACE)


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


def read_calibration_list(path: str | Path) -> list[str]:
    """The entries of a ``calib.list`` file: one image per line (blank lines skipped)."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise DataError(f"calib.list {path} does not exist. Fix: point calib.list at a file with one image per line.")
    entries = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not entries:
        raise DataError(f"calib.list {path} lists no images. Fix: one image per line (a path, or train[i]).")
    return entries
