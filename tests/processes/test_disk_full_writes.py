"""trainer.fileio on a full file system (a real size-limited tmpfs; the tests run as root): an
atomic write that does not fit raises DiskFull naming the file, leaves no temporary file and the
file already there as it was; the errors of the libraries that write for us are recognised."""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from trainer.errors import BadInput
from trainer.fileio import DiskFull, atomic_write_text, is_disk_full, writing


@pytest.fixture
def full_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs holding ``old.txt`` (one page), the rest taken by a filler but one page."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "old.txt").write_text("published\n")
        st = os.statvfs(mnt)
        fd = os.open(mnt / ".filler", os.O_CREAT | os.O_WRONLY)
        os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - 4096)
        os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_an_atomic_write_that_does_not_fit_names_the_file_and_leaves_the_old_one(full_fs: Path) -> None:
    with pytest.raises(DiskFull) as e:
        atomic_write_text(full_fs / "old.txt", "x" * 20000)
    assert isinstance(e.value, BadInput)  # the jobs print it as one line, exit code 2
    assert str(e.value).startswith(f"the disk is full: writing {full_fs / 'old.txt'} failed (No space left on device")
    assert (full_fs / "old.txt").read_text() == "published\n"
    assert sorted(p.name for p in full_fs.iterdir()) == [".filler", "old.txt"]  # no temporary left
    atomic_write_text(full_fs / "small.txt", "fits\n")  # one page still fits
    assert (full_fs / "small.txt").read_text() == "fits\n"


def test_safetensors_and_torch_save_failures_are_recognised(full_fs: Path) -> None:
    big = {"w": torch.zeros(8192)}
    with pytest.raises(Exception) as e:  # safetensors raises its own error type, without an errno
        save_file(big, full_fs / "w.safetensors")
    assert is_disk_full(e.value)
    with pytest.raises(RuntimeError) as e:  # torch.save's zip writer loses the errno too
        torch.save(big, full_fs / "w.pt")
    assert is_disk_full(e.value, full_fs)
    with pytest.raises(DiskFull, match=str(full_fs / "w.pt")), writing(full_fs / "w.pt"):
        torch.save(big, full_fs / "w.pt")
    assert not is_disk_full(RuntimeError("unexpected pos 1 vs 2"), Path("/"))  # a disk with room is not full
