"""The package's file doors. What runs write: files replaced atomically (a crash mid-write keeps the previous one,
a link there is replaced, never written through), tensors as CPU copies, the checksums that tie a run dir's files
to its records. What they read: ``read_bytes``, ``read_text`` and ``read_json``, which refuse by kind what is
not a regular file (and, for a run's own files, a link) and decode strictly, each failure one error naming the
file. No torch import: the collector uses it too."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mgrq_runner.errors import DataError, DiskFullError, OutputError

if TYPE_CHECKING:
    import torch

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Calls ``write`` on a temporary name next to ``path``, then moves the result onto ``path``.

    The temporary name is unique (process id and a random part), so two writers never share one. ``path`` itself
    is replaced, never written through: a symbolic link there is replaced by the file, its target left alone. A
    full disk is a ``DiskFullError`` naming the file; the previous file stays as it was. A folder in its place
    is an ``OutputError`` naming it.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        try:
            os.replace(tmp, path)
        except OSError as err:  # a folder (or a mount point) where the file goes: one line, not a traceback
            if no_space(err):
                raise
            raise OutputError(
                f"{path} cannot be written: it is {file_kind(path)} ({err.strerror}). Fix: remove or rename it (a "
                "run writes its own files there)."
            ) from None
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
    return _mode_kind(mode)


def _mode_kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


# ---------------------------------------------------------------------------------------------- the one reader
# Every file the package reads from a run dir, an export or the user's data set comes through read_bytes: it is
# opened once (O_NONBLOCK, so a named pipe cannot hang the open), its kind is checked on the open descriptor (no
# race with a swap), and with follow_links=False a symbolic link is refused (O_NOFOLLOW): the files a run wrote
# itself are never links. Each failure is one ``error`` naming the file, what it is, and ``fix``.


def read_bytes(
    path: Path, what: str, fix: str, *, error: type[Exception] = DataError, follow_links: bool = True
) -> bytes:
    """The bytes of regular file ``path`` (``what`` names it in messages); anything else is one ``error``."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist. Fix: {fix}.") from None
    except OSError as err:
        if err.errno == errno.ELOOP and path.is_symlink():
            state = "is a symbolic link (a run's own files are never links)"
        elif err.errno == errno.ENXIO:
            state = "is a socket"
        else:
            state = f"cannot be read ({err.strerror})"
        raise error(f"{what} {path} {state}. Fix: {fix}.") from None
    kind = _mode_kind(os.fstat(descriptor).st_mode)
    if kind != "a file":
        os.close(descriptor)
        raise error(f"{what} {path} is {kind}, not a file. Fix: {fix}.")
    os.set_blocking(descriptor, True)
    with os.fdopen(descriptor, "rb") as handle:
        try:
            return handle.read()
        except OSError as err:
            raise error(f"{what} {path} cannot be read ({err.strerror}). Fix: {fix}.") from None


def read_text(path: Path, what: str, fix: str, *, error: type[Exception] = DataError, follow_links: bool = True) -> str:
    """``read_bytes`` decoded as UTF-8 (strict; a leading byte-order mark is dropped)."""
    raw = read_bytes(path, what, fix, error=error, follow_links=follow_links)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise error(
            f"{what} {path} is not UTF-8 text (byte {err.start}: {raw[err.start : err.start + 1]!r}). Fix: {fix} "
            "(saved as UTF-8)."
        ) from None


def read_json(
    path: Path, what: str, fix: str, *, error: type[Exception] = DataError, follow_links: bool = True
) -> dict[str, Any]:
    """``read_text`` parsed as one JSON object (a list, a number or invalid JSON is one ``error``)."""
    text = read_text(path, what, fix, error=error, follow_links=follow_links)
    try:
        data = json.loads(text)
    except ValueError as err:  # JSONDecodeError, or an integer too long for Python to convert
        where = f"{err.msg}, line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else err
        raise error(f"{what} {path} is not valid JSON ({where}). Fix: {fix}.") from None
    except RecursionError:
        raise error(f"{what} {path} nests deeper than JSON readers allow. Fix: {fix}.") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} holds a JSON {type(data).__name__}, not an object. Fix: {fix}.")
    return data


def read_calibration_list(path: str | Path) -> list[str]:
    """The entries of a ``calib.list`` file: one image per line (blank lines skipped)."""
    path = Path(os.path.expanduser(str(path)))
    text = read_text(path, "calib.list", "point calib.list at a file with one image per line")
    entries = [line.strip() for line in text.splitlines() if line.strip()]
    if not entries:
        raise DataError(f"calib.list {path} lists no images. Fix: one image per line (a path, or train[i]).")
    return entries
