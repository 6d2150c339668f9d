"""What runs write: files replaced atomically (a crash mid-write keeps the previous one), tensors as CPU copies,
and the checksums that tie a run dir's files to its records; the user's text files read strictly. No torch
import: the collector uses it too."""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
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


def file_kind(path: Path) -> str:
    """What ``path`` is, in words: a file, a directory, a named pipe, a device, a socket, or missing."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def read_user_text(path: Path, what: str, fix: str) -> str:
    """A text file the user gave (``what`` names it in messages): a regular file, UTF-8 (a byte-order mark is
    dropped); anything else is one ``DataError`` naming the file, what it is, and ``fix``."""
    kind = file_kind(path)
    if kind != "a file":
        state = "does not exist" if kind == "missing" else f"is {kind}, not a text file"
        raise DataError(f"{what} {path} {state}. Fix: {fix}.")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{what} {path} is not UTF-8 text (byte {err.start}: {raw[err.start : err.start + 1]!r}). Fix: {fix}, "
            "saved as UTF-8."
        ) from None


def read_calibration_list(path: str | Path) -> list[str]:
    """The entries of a ``calib.list`` file: one image per line (blank lines skipped)."""
    path = Path(os.path.expanduser(str(path)))
    text = read_user_text(path, "calib.list", "point calib.list at a file with one image per line")
    entries = [line.strip() for line in text.splitlines() if line.strip()]
    if not entries:
        raise DataError(f"calib.list {path} lists no images. Fix: one image per line (a path, or train[i]).")
    return entries
