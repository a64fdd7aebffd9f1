"""Small file helpers every format shares: sha256, atomic writes, JSON reads, checksum checks.

A reader never sees half a file: ``atomic_write_*`` write a temporary file in the same folder,
fsync it and rename it into place, then fsync the folder. Files get the mode a plain ``open()``
would give them (``publish_mode``), so other users of a shared run folder can read them.

Standard library only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
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


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same folder + fsync + os.replace: never half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
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
