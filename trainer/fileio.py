"""Small file helpers every format shares: sha256, atomic writes, JSON reads, checksum checks.

A reader never sees half a file: ``atomic_write_*`` write a temporary file in the same folder,
fsync it and rename it into place, then fsync the folder. Files get the mode a plain ``open()``
would give them (``publish_mode``), so other users of a shared run folder can read them.

Standard library only.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from trainer.errors import BadInput


def sha256_file(path: str | Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def publish_mode(path: str | Path) -> None:
    """Give a file made by mkstemp/mkdtemp (0600/0700) the mode a plain open() would have: other
    users of a shared run folder must be able to read checkpoints and exports."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_UMASK)


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file in ``path`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir(tmp: str | Path, out_dir: str | Path) -> None:
    """Put the finished folder ``tmp`` at ``out_dir``, replacing a folder already there: the old one is
    renamed aside first and deleted last, so ``out_dir`` is never a mix of the two."""
    tmp, out_dir = Path(tmp), Path(out_dir)
    if out_dir.exists():
        old = out_dir.with_name(f".old-{out_dir.name}-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


# --------------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------------
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFull(BadInput, OSError):
    """A write failed because its file system is full (or the user's quota is used up). The message
    names the file; what was being written is not published (temporary names, removed), so after
    space is freed a rerun resumes and ends as an uninterrupted run would."""


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def disk_full(path: str | Path, cause: BaseException | None = None) -> DiskFull:
    """The one-line error of a write to ``path`` that found its file system full."""
    path = Path(path)
    free = _free_bytes(path)
    why = getattr(cause, "strerror", None) or "No space left on device"
    room = f"{free / 2**20:.1f} MiB free there now" if free is not None else "free space unknown"
    return DiskFull(f"the disk is full: writing {path} failed ({why}; {room}); nothing half-written was "
                    "published: free space and run it again, finished work is kept")


# What the libraries that write for us raise on a full disk (measured on a full tmpfs, torch 2.13):
# safetensors: SafetensorError "... I/O error: No space left on device (os error 28)"; torch.save
# (DeepSpeed's checkpoint shards): RuntimeError "basic_ios::clear: iostream error" and then
# "[enforce fail at inline_container.cc] unexpected pos ..." or "file write failed", without errno.
_NO_SPACE_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
_TORCH_WRITE_TEXT = ("iostream error", "unexpected pos", "write failed")


def is_disk_full(e: BaseException, path: str | Path | None = None) -> bool:
    """``e`` is a write that failed for lack of space: an OSError with ENOSPC/EDQUOT, an error that
    says so (safetensors), or torch.save's errno-less write failure while ``path``'s file system has
    less than 1 MiB free."""
    if isinstance(e, DiskFull):
        return True
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno in DISK_FULL_ERRNOS
    text = str(e)
    if any(t in text for t in _NO_SPACE_TEXT):
        return True
    if isinstance(e, RuntimeError) and path is not None and any(t in text for t in _TORCH_WRITE_TEXT):
        free = _free_bytes(Path(path))
        return free is not None and free < 2**20
    return False


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Inside the block, a write that fails for lack of space becomes ``DiskFull`` naming ``path``
    (a write() or fsync on an open file raises ENOSPC without a file name)."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if is_disk_full(e, path):
            raise disk_full(getattr(e, "filename", None) or path, e) from e
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same folder + fsync + os.replace: never half a file. A full
    disk raises ``DiskFull`` naming ``path`` (the temporary file is removed)."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """``atomic_write_text`` for bytes."""
    path = Path(path)
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            publish_mode(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any, indent: int = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def read_json(path: str | Path, error: type[Exception] = BadInput, want_object: bool = False) -> Any:
    """The JSON in ``path``; a missing or corrupt file raises ``error`` naming the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: corrupt JSON ({e})") from None
    if want_object and not isinstance(obj, dict):
        raise error(f"{path}: corrupt: not a JSON object")
    return obj


def verify_file(path: str | Path, entry: Mapping[str, Any]) -> str | None:
    """Why ``path`` does not match its manifest entry (``bytes``, ``sha256``: size first, then the
    hash), or None when it does."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"size {size} bytes, manifest says {entry['bytes']} (truncated or altered)"
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        return f"sha256 {digest[:16]}... does not match the manifest's {entry['sha256'][:16]}... (corrupt)"
    return None
