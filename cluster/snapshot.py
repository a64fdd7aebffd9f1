"""The code snapshot: what a job runs, copied into the run folder at submission, addressed by content."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

# What a job needs of the repository: copied into the run folder at submission.
CODE_DIRS = ("trainer", "cluster", "tools", "configs")


# --------------------------------------------------------------------------------------------------
# Code snapshot
# --------------------------------------------------------------------------------------------------
def _code_files(repo: Path) -> list[Path]:
    files = []
    for top in CODE_DIRS:
        root = repo / top
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: not found; the code snapshot needs {', '.join(CODE_DIRS)}")
        for p in sorted(root.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo"):
                files.append(p)
    return files


def snapshot_code(repo: Path, run_dir: Path) -> Path:
    """Copy the job code into ``<run>/code/<content hash>`` (unless that snapshot exists) and return it.

    Named by content, so resubmitting unchanged code reuses the snapshot and a change makes a new
    one beside it (jobs already queued keep theirs). Written to a temporary folder and renamed, so a
    snapshot folder is always complete."""
    repo, run_dir = Path(repo).resolve(), Path(run_dir).resolve()
    files = _code_files(repo)
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(repo)).encode() + b"\0" + p.read_bytes() + b"\0")
    dest = run_dir / "code" / h.hexdigest()[:16]
    if dest.is_dir():
        return dest
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for p in files:
        target = tmp / p.relative_to(repo)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, target)
    try:
        os.rename(tmp, dest)
    except OSError:  # a concurrent submission made the same snapshot first
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():
            raise
    return dest

