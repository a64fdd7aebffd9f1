"""The checkpoint-folder protocol (trainer.runtime.checkpoint.CheckpointDir) on plain folders: what the
engine's save relies on, without DeepSpeed (tests/runtime/test_engine.py runs it under ZeRO)."""
from __future__ import annotations

import json
from pathlib import Path

from trainer.runtime.checkpoint import LATEST, META, CheckpointDir


def _save(ckpt: CheckpointDir, tag: str, step: int, payload: str, keep: int = 0) -> Path:
    tmp = ckpt.begin(tag)
    tmp.mkdir()  # DeepSpeed makes it on every rank; here one file stands for its shards
    (tmp / "shard.pt").write_text(payload)
    return ckpt.publish(tmp, tag, {"step": step, "tag": tag}, keep)


def test_publish_writes_the_manifest_then_names_the_tag_latest(tmp_path: Path) -> None:
    ckpt = CheckpointDir(tmp_path / "ckpt")
    assert ckpt.latest() is None
    final = _save(ckpt, "step_1", 1, "a")
    assert final == ckpt.root / "step_1" and ckpt.latest() == "step_1"
    assert (ckpt.root / LATEST).read_text() == "step_1\n"
    assert json.loads((final / META).read_text()) == {"step": 1, "tag": "step_1"} == ckpt.meta("step_1")
    assert sorted(p.name for p in ckpt.root.iterdir()) == [LATEST, "step_1"]  # no .tmp- left


def test_resaving_a_tag_replaces_it_whole_and_drops_its_old_conversion(tmp_path: Path) -> None:
    ckpt = CheckpointDir(tmp_path / "ckpt")
    _save(ckpt, "step_1", 1, "old")
    (ckpt.root / "step_1" / "only_in_old.txt").write_text("x")
    ckpt.universal("step_1").mkdir()  # a conversion made from the old save
    _save(ckpt, "step_1", 1, "new")
    assert (ckpt.root / "step_1" / "shard.pt").read_text() == "new"
    assert not (ckpt.root / "step_1" / "only_in_old.txt").exists()
    assert not ckpt.universal("step_1").exists()
    assert sorted(p.name for p in ckpt.root.iterdir()) == [LATEST, "step_1"]  # the old one was not kept aside


def test_retain_keeps_the_newest_by_step_and_never_the_latest(tmp_path: Path) -> None:
    ckpt = CheckpointDir(tmp_path / "ckpt")
    for step in (1, 2, 3):
        _save(ckpt, f"step_{step}", step, str(step))
    _save(ckpt, "step_4", 4, "4", keep=2)
    assert sorted(p.name for p in ckpt.root.iterdir() if p.name != LATEST) == ["step_3", "step_4"]
    # `latest` names an older step (a re-save of step 2): kept beside the newest `keep`
    _save(ckpt, "step_2", 2, "again", keep=1)
    assert ckpt.latest() == "step_2"
    assert sorted(p.name for p in ckpt.root.iterdir() if p.name != LATEST) == ["step_2", "step_4"]


def test_sweep_removes_leftovers_and_conversions_of_deleted_checkpoints(tmp_path: Path) -> None:
    ckpt = CheckpointDir(tmp_path / "ckpt")
    _save(ckpt, "step_1", 1, "a")
    leftovers = [".tmp-step_2", ".tmp-step_1.universal", ".old-step_1-123", ".trash-step_1-456", "step_9.universal"]
    for name in leftovers:
        (ckpt.root / name).mkdir()
    ckpt.universal("step_1").mkdir()  # of a checkpoint that exists: kept
    ckpt.sweep()
    assert sorted(p.name for p in ckpt.root.iterdir()) == [LATEST, "step_1", "step_1.universal"]


def test_an_interrupted_save_leaves_latest_on_the_previous_checkpoint(tmp_path: Path) -> None:
    ckpt = CheckpointDir(tmp_path / "ckpt")
    _save(ckpt, "step_1", 1, "a")
    tmp = ckpt.begin("step_2")
    tmp.mkdir()
    (tmp / "shard.pt").write_text("half")  # never published
    assert ckpt.latest() == "step_1" and not (ckpt.root / "step_2").exists()
    assert ckpt.begin("step_2") == tmp and not tmp.exists()  # the next save of the tag clears it
