"""Atomic file writes: a reader (or a run killed mid-write) sees the old file or the new one, never
half of one."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


class OutputWriteError(OSError):
    """An output could not be written (read-only or full disk, ...); the previous file is intact.
    `reason` is the system's word for why (e.g. "No space left on device")."""

    def __init__(self, errno_: int | None, message: str, reason: str):
        super().__init__(errno_, message)
        self.reason = reason

    def __str__(self) -> str:
        return self.strerror


def _reason(err: OSError) -> str:
    return getattr(err, "reason", None) or err.strerror or str(err)


def write_error(path: str | Path, err: OSError, note: str = "") -> OutputWriteError:
    """The OutputWriteError for an OSError met while writing `path`."""
    return OutputWriteError(err.errno, f"cannot write {path}: {_reason(err)}{note}", _reason(err))


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Yield a file handle (open_kwargs go to open, e.g. newline="") on a temporary file beside
    `path`; on success it is flushed to disk and renamed over `path` (os.replace is atomic on
    POSIX); on any error it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    except OSError as err:
        raise write_error(path, err) from err
    try:
        with os.fdopen(fd, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, OutputWriteError):
            raise write_error(path, err, "; the previous file (if any) is intact") from err
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_writer(path, "w") as fh:
        fh.write(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def check_writable(directory: str | Path) -> None:
    """Create `directory` and write (then remove) a small probe file in it, so a read-only or full
    disk is reported before any work is done rather than at the first output."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_text(directory / ".write_probe", "x" * 4096)
        os.unlink(directory / ".write_probe")
    except OSError as err:
        raise OutputWriteError(err.errno, f"output directory {directory} is not writable: {_reason(err)}",
                               _reason(err)) from err
