"""Atomic file publishing, shared by the model library (``models.save_pretrained``) and the SR toolkit (images,
training checkpoints, configs, logs, ``upscale`` outputs); it imports nothing else of srkernels.

Every writer goes through :func:`atomic_write`: the bytes go to a temp file beside the target, are fsynced,
and only then is the temp file moved into place, so a reader (or a crash) sees the old file or the complete
new one, never a partial file at the final path. Temp files are named ``.<name>.<pid>.<8 hex>.tmp[<ext>]``:
the writer's pid lets a later run find and delete the leftovers of a killed writer
(:func:`remove_stale_temp_files`).
"""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Union

__all__ = ["atomic_write", "temp_path", "remove_stale_temp_files", "fsync_dir", "TEMP_NAME"]

#: the names :func:`temp_path` gives (``name`` = the target's file name, ``pid`` = the writing process)
TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp(?:\.[A-Za-z0-9]+)?")

Content = Union[bytes, bytearray, memoryview, Callable[[BinaryIO], object]]


def temp_path(path: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh temp file name beside ``path`` that :func:`remove_stale_temp_files` recognises; ``suffix``
    (e.g. ``".png"``) is appended for writers that pick a format from the file name."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory so that a rename inside it survives a crash (best effort: not every OS allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, content: Content, *, overwrite: bool = True, suffix: str = "",
                 sync_dir: bool = False) -> Path:
    """Write ``content`` (bytes, or a function that writes into a binary file object) to ``path`` atomically.

    With ``overwrite`` the temp file replaces ``path`` (``os.replace``). Without it, it is hard-linked to
    ``path``, which fails if ``path`` exists, even if it appeared after any earlier check: then
    ``FileExistsError`` and nothing at ``path`` changes. (On a filesystem without hard links: check, then
    rename.) The parent folder is created; ``sync_dir`` also fsyncs it after the move. On any error the temp
    file is removed. The temp file gets the default permissions (umask), unlike ``mkstemp``'s 0600."""
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {type(overwrite).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, suffix)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
            except OSError:  # no hard links on this filesystem
                if path.exists():
                    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
                os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)  # after a link (or a failure); after os.replace it is already gone
        except OSError:
            pass
    if sync_dir:
        fsync_dir(path.parent)
    return path


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we wrote: leave the file alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True
    return True


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files :func:`atomic_write` left in ``directory`` when its process was killed
    (``kill -9``, power loss): those whose writing process (on this machine) no longer runs. Returns them."""
    d = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(d.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = TEMP_NAME.fullmatch(p.name)
        if m is None or int(m.group("pid")) == os.getpid() or _pid_alive(int(m.group("pid"))):
            continue
        try:
            if p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p)
        except OSError:
            pass
    return removed
