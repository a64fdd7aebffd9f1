"""A full disk at every write path of the chain, on a real small file system (a size-limited tmpfs;
the tests run as root, CI too): the prepared token file, a checkpoint, an export, a target shard,
evaluation metrics and the report.

For each: a reference chain runs uninterrupted (a short tiny config, one round) and the run folder
is copied before each stage. The case copies the folder as it was before its stage, mounts a tmpfs
at the folder its write goes to, and fills it so that the stage runs out of room in that write
(a filler file: the room left is what the reference run's files before it took, plus half of the
file itself). ``tools/submit.py --local`` must then stop with ONE line naming the disk and the file,
publish nothing half-written and leave every file already there as it was; with the filler deleted
(space back), a rerun of the stage must end with the same products as the reference run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import pipeline
from tests.helpers import REPO, TINY, env
from trainer.config import load_config, save_config
from trainer.fileio import sha256_file
from trainer.layout import RunLayout

OVERRIDES = ["train.steps=10", "train.eval_every=10", "train.ckpt_every=10", "optim.warmup_steps=5",
             "data.num_train_sequences=8192", "data.num_valid_sequences=64", "distill.rounds=1",
             "distill.start_steps=16", "distill.steps_per_round=4", "distill.warmup_steps=2",
             "targets.num_samples=128", "targets.samples_per_shard=32", "eval.steps=[4,16]", "eval.temperatures=[1.0]",
             "eval.num_samples=64", "train.eval_batches=2", "distill.control=false"]
PAGE = 4096


def pages(path: Path) -> int:
    """Bytes a tmpfs charges for the files under ``path`` (whole pages per file)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in files)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file a stage publishes (not the bookkeeping that changes with each attempt)."""
    skip = ("logs", "pipeline_state.json", "pipeline_state.json.lock", "run.lock.json", ".run.lock", "tb")
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] not in skip
            and p.name != "metrics.jsonl"}  # (an append-only log: a job's metrics lines before it failed)


def without_timings(obj):
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in ("seconds", "created", "time")}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


class Reference:
    """The uninterrupted chain, run lazily as far as a test needs it, with a copy of the run folder
    taken before each stage."""

    def __init__(self, base: Path) -> None:
        self.base, self.run = base, base / "run"
        self.run.mkdir()
        save_config(load_config(TINY, OVERRIDES), RunLayout(self.run).config)
        self.stages = pipeline.build_chain(load_config(RunLayout(self.run).config))
        self.done = 0

    def before(self, stage: str) -> Path:
        self._upto([s.name for s in self.stages].index(stage) - 1)
        return self.base / f"before_{stage}"

    def after(self, stage: str) -> Path:
        """The reference run folder once ``stage`` ran (later stages keep its files)."""
        self._upto([s.name for s in self.stages].index(stage))
        return self.run

    def _upto(self, last: int) -> None:
        """Run stages 0..last; the copy before each stage that ran, and before stage last + 1."""
        while self.done <= last + 1 and self.done < len(self.stages):
            snap = self.base / f"before_{self.stages[self.done].name}"
            if not snap.exists():
                shutil.copytree(self.run, snap, symlinks=True)
            if self.done > last:
                return
            _run_stages(self.run, self.stages[: self.done + 1])
            self.done += 1


def _run_stages(run: Path, stages: list[pipeline.Stage]) -> None:
    old = dict(os.environ)
    os.environ.update(env())
    try:
        pipeline.run_local(stages, run, nproc=2, log=lambda m: None)
    finally:
        os.environ.clear()
        os.environ.update(old)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    return Reference(tmp_path_factory.mktemp("disk_full_reference"))


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[callable]:
    """mount(folder, room): a tmpfs at ``folder`` with ``room`` bytes free (the rest taken by a filler
    file outside ``folder``'s tree: the tmpfs is mounted at ``folder``, the filler sits in it as
    ``.filler``); returns the filler's path. Unmounted at the end."""
    mounts: list[Path] = []

    def mount(folder: Path, room: int) -> Path:
        room = room // PAGE * PAGE  # a tmpfs counts whole pages
        folder.mkdir(parents=True, exist_ok=True)
        assert not any(folder.iterdir()), f"{folder} must be empty to mount over it"
        filler_size = 32 << 20  # once deleted, room for the whole stage (the largest: ~15 MB here)
        size = room + filler_size
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
        mounts.append(folder)
        filler = folder / ".filler"
        fd = os.open(filler, os.O_CREAT | os.O_WRONLY)
        try:
            os.posix_fallocate(fd, 0, free_bytes(folder) - room)
        finally:
            os.close(fd)
        assert free_bytes(folder) == room
        return filler

    yield mount
    for folder in reversed(mounts):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def submit_local(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/submit.py", "--local", "--run-dir", str(run)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=900)


def rerun(run: Path, stage: str) -> None:
    """Run the chain up to ``stage`` (the rest is not needed to compare it)."""
    stages = pipeline.build_chain(load_config(RunLayout(run).config))
    _run_stages(run, stages[: [s.name for s in stages].index(stage) + 1])


def fail_at(reference: Reference, tmp_path: Path, small_fs, stage: str, mount_rel: str, room: int,
            names: str) -> tuple[Path, Path, str]:
    """Copy the run as it was before ``stage``, mount a tmpfs with ``room`` bytes free at ``mount_rel``,
    run the chain: it must stop in ``stage`` with one line saying the disk is full writing a path
    under the mount whose name contains ``names``. Returns (run, filler, the line)."""
    run = tmp_path / "run"
    shutil.copytree(reference.before(stage), run, symlinks=True)
    before = digests(run)
    filler = small_fs(run / mount_rel, room)
    out = submit_local(run)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-4000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    line = lines[0]
    print(f"\n{stage}: {line}")
    assert line.startswith(f"error: stage '{stage}' failed with exit code "), line
    assert ": the disk is full: writing " in line and "No space left on device" in line, line
    written = line.split(": the disk is full: writing ", 1)[1].split(" failed (", 1)[0]
    assert Path(written).is_relative_to(run / mount_rel) and names in Path(written).name, line
    # Nothing already published was touched.
    after = digests(run)
    assert {k: after.get(k) for k in before} == before
    product = next(s.product for s in reference.stages if s.name == stage)
    assert not (run / product).exists()
    return run, filler, line


def test_token_file(reference, tmp_path, small_fs):
    ref = reference.after("prepare") / "data"
    room = pages(ref / "train.npy") // 2  # train.npy is written first; half of it fits
    run, filler, _ = fail_at(reference, tmp_path, small_fs, "prepare", "data", room, "train.npy")
    assert sorted(p.name for p in (run / "data").iterdir()) == [".filler"]  # no partial split left
    filler.unlink()
    rerun(run, "prepare")
    for name in ("train.npy", "valid.npy", "data.json"):
        assert sha256_file(run / "data" / name) == sha256_file(ref / name), name


def test_checkpoint(reference, tmp_path, small_fs):
    ref = reference.after("teacher") / "teacher" / "checkpoints"
    room = pages(ref) // 2  # the only save (train.steps = ckpt_every) runs out half-way
    run, filler, _ = fail_at(reference, tmp_path, small_fs, "teacher", "teacher/checkpoints", room, "step_")
    ckpts = run / "teacher" / "checkpoints"
    assert not (ckpts / "latest").exists() and not [p for p in ckpts.iterdir() if p.name.startswith("step_")]
    filler.unlink()
    rerun(run, "teacher")
    _same_export(run / "teacher" / "export", reference.after("teacher") / "teacher" / "export")


def test_export(reference, tmp_path, small_fs):
    ref = reference.after("teacher") / "teacher"
    room = pages(ref / "checkpoints") + pages(ref / "export" / "model.safetensors") // 2
    run, filler, _ = fail_at(reference, tmp_path, small_fs, "teacher", "teacher", room, "export")
    teacher = run / "teacher"
    assert not (teacher / "export").exists()
    assert not [p for p in teacher.iterdir() if p.name.startswith(".tmp-export")]  # the partial export is gone
    assert (teacher / "checkpoints" / "latest").is_file()  # the checkpoint before it is whole
    filler.unlink()
    rerun(run, "teacher")
    _same_export(teacher / "export", ref / "export")


def _same_export(got: Path, want: Path) -> None:
    for name in ("model.safetensors", "ema.safetensors", "config.yaml"):
        assert sha256_file(got / name) == sha256_file(want / name), name
    assert without_timings(json.loads((got / "export.json").read_text())) == \
        without_timings(json.loads((want / "export.json").read_text()))


def test_target_shard(reference, tmp_path, small_fs):
    ref = reference.after("targets_1") / "round_1" / "targets"
    shard = max(p.stat().st_size for p in ref.glob("*.tar"))
    # plan.json, one shard and its record fit; the second shard (written beside it by the other rank)
    # runs out half-way.
    room = pages(ref / "plan.json") + 2 * PAGE + -(-shard // PAGE) * PAGE + shard // 2
    run, filler, _ = fail_at(reference, tmp_path, small_fs, "targets_1", "round_1/targets", room, ".tar")
    out = run / "round_1" / "targets"
    from trainer.targets import shards
    plan = json.loads((out / "plan.json").read_text())
    for p in out.glob("*.tar"):  # every published shard is whole and recorded
        j = int(p.stem.rsplit("-", 1)[1])
        assert shards.completed(out, j, shards.header_digest(plan)) is not None, p.name
    filler.unlink()
    rerun(run, "targets_1")
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()


def test_eval_metrics(reference, tmp_path, small_fs):
    ref = reference.after("eval_0") / "teacher" / "eval"
    room = pages(ref / "samples.txt")  # samples.txt is written first and fits; metrics.json does not
    run, filler, _ = fail_at(reference, tmp_path, small_fs, "eval_0", "teacher/eval", room, "metrics.json")
    assert sorted(p.name for p in (run / "teacher" / "eval").iterdir()) == [".filler", "samples.txt"]
    filler.unlink()
    rerun(run, "eval_0")
    got = json.loads((run / "teacher" / "eval" / "metrics.json").read_text())
    assert without_timings(got) == without_timings(json.loads((ref / "metrics.json").read_text()))


def test_report(reference, tmp_path, small_fs):
    ref = reference.after("report")
    # The whole run folder on the small file system, with room for the bookkeeping only (the lock,
    # the state file, the stage's log: a page each, twice while replaced): the report's plot fails.
    room = 6 * PAGE
    assert (ref / "quality_vs_steps.png").stat().st_size > room
    mnt = tmp_path / "mnt"
    filler = small_fs(mnt, pages(reference.before("report")) + (4 << 20))
    shutil.copytree(reference.before("report"), mnt / "run", symlinks=True)
    before = digests(mnt / "run")
    fd = os.open(mnt / ".filler2", os.O_CREAT | os.O_WRONLY)
    os.posix_fallocate(fd, 0, free_bytes(mnt) - room)
    os.close(fd)
    run = mnt / "run"
    out = submit_local(run)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: stage 'report' failed with exit code "), out.stderr
    assert f": the disk is full: writing {run}/" in lines[0], lines[0]
    assert digests(run) == before  # nothing published, nothing touched
    filler.unlink()
    (mnt / ".filler2").unlink()
    rerun(run, "report")
    assert without_timings(json.loads((run / "report.json").read_text())) == \
        without_timings(json.loads((ref / "report.json").read_text()))
    assert (run / "report.md").read_text() == (ref / "report.md").read_text()
