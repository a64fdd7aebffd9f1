"""trainer/targets/shards.py: the shard plan, the atomic writer, the manifest, verification; and
tools/inspect_shards.py on a small hand-made target set."""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import TINY
from tools import inspect_shards
from trainer.config import load_config
from trainer.method import codecs as C
from trainer.targets import shards as SH

V, L = 16, 12


def _header(num_samples=10, per_shard=4, codec="topk", k=4) -> dict:
    return {"format": SH.FORMAT, "teacher": "teacher/export", "teacher_weights": "ema", "teacher_sha256": "ab" * 32,
            "data_digest": "cd" * 32, "tokenizer": "synthetic", "seed": 0, "round": 1, "student_steps": 32,
            "teacher_steps": 2, "dt": 0.015, "t_min": 1e-5, "noise_eps": 1e-3, "train_eps": 1e-3, "codec": codec,
            "k": k, "seq_len": L, "vocab_size": V, "mask_id": V, "num_samples": num_samples,
            "samples_per_shard": per_shard, "batch_size": 2, "prefix": "targets", "rows": "test"}


def _example(index: int, codec="topk", k=4):
    g = torch.Generator().manual_seed(index)
    xt = torch.randint(0, V, (L,), generator=g)
    xt[torch.rand(L, generator=g) < 0.5] = V
    m = int((xt == V).sum())
    lp = torch.log_softmax(2 * torch.randn(m, V, generator=g), -1)
    fields = C.encode(lp, codec, k, g)
    meta = {"index": index, "round": 1, "t": 0.5, "num_masked": m}
    return xt.numpy().astype(np.int32), fields, meta, C.stats(fields, codec)


def _write_set(out: Path, num_samples=10, per_shard=4, rank_of=lambda j: 0, codec="topk") -> tuple[dict, SH.ShardPlan]:
    header = _header(num_samples, per_shard, codec)
    plan = SH.ShardPlan(num_samples, per_shard)
    SH.start_set(out, header)
    digest = SH.header_digest(header)
    for j in range(plan.num_shards):
        with SH.ShardWriter(out, plan, j, rank_of(j), digest) as w:
            for i in plan.indices(j):
                w.add(i, *_example(i, codec))
            w.finish()
    return SH.write_manifest(out, header, plan), plan


# --------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------
def test_plan_is_a_function_of_the_index():
    plan = SH.ShardPlan(num_samples=10, samples_per_shard=4)
    assert plan.num_shards == 3
    assert [list(plan.indices(j)) for j in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for world in (1, 2, 3, 5):
        owned = [plan.owned(r, world) for r in range(world)]
        assert sorted(sum(owned, [])) == [0, 1, 2]  # every shard exactly once
    assert plan.batches(1, 3) == [range(4, 7), range(7, 8)]  # fixed blocks from the shard start
    assert plan.shard_name(3, 17) == "targets-0003-000017.tar"


def test_size_limit_rotates_by_a_bound_decided_up_front():
    worst = SH.max_sample_bytes("topk", 8, 64, 64)
    assert worst >= 64 * C.bytes_per_position("topk", 8, 64) + 4 * 64
    assert SH.samples_per_shard(256, 10 * worst, worst) == 10
    assert SH.samples_per_shard(4, 10 * worst, worst) == 4
    assert SH.samples_per_shard(256, 1024, worst) == 1  # never zero


def test_the_runs_plan_follows_the_config():
    """plan_for: the count limit, or the byte limit over the configured codec's worst case."""
    base = ["data.seq_len=64", "model.vocab_size=64", "targets.codec=topk", "targets.k=8", "targets.num_samples=100"]
    worst = SH.max_sample_bytes("topk", 8, 64, 64)
    by_count = SH.plan_for(load_config(TINY, [*base, "targets.samples_per_shard=16",
                                              f"targets.shard_max_bytes={100 * worst}"]))
    assert (by_count.num_samples, by_count.samples_per_shard, by_count.num_shards) == (100, 16, 7)
    by_bytes = load_config(TINY, [*base, "targets.samples_per_shard=16", f"targets.shard_max_bytes={3 * worst + 1}"])
    assert SH.plan_for(by_bytes).samples_per_shard == 3
    assert SH.plan_for(by_bytes, 10) == SH.ShardPlan(10, 3)  # another sample count, the same shards


# --------------------------------------------------------------------------------------------------
# Writer, reader
# --------------------------------------------------------------------------------------------------
def test_shard_round_trip_contiguous_and_deterministic(tmp_path):
    manifest, plan = _write_set(tmp_path / "a")
    _write_set(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert names == [s["name"] for s in manifest["shards"]]
    for s in manifest["shards"]:  # same samples -> same bytes (no mtimes, users, hosts)
        assert SH.sha256_file(tmp_path / "a" / s["name"]) == SH.sha256_file(tmp_path / "b" / s["name"])
    # files of a sample are contiguous, in the order xt, codec fields, meta
    with tarfile.open(tmp_path / "a" / names[0]) as tar:
        members = [m.name for m in tar.getmembers()]
    assert members[:5] == ["0000000000.xt.npy", "0000000000.ids.npy", "0000000000.logp.npy",
                           "0000000000.logtail.npy", "0000000000.meta.json"]
    got = [s for n in names for s in SH.iter_samples(tmp_path / "a" / n)]
    assert [s["meta"]["index"] for s in got] == list(range(10))
    for s in got:
        xt, fields, meta, _ = _example(s["meta"]["index"])
        assert np.array_equal(s["xt"], xt) and s["meta"] == meta
        assert all(np.array_equal(s[f], fields[f]) and s[f].dtype == fields[f].dtype for f in fields)
    assert manifest["totals"]["samples"] == 10 and manifest["totals"]["shards"] == 3
    assert manifest["totals"]["positions"] == sum(s["meta"]["num_masked"] for s in got)


def test_webdataset_reads_the_shards(tmp_path):
    import webdataset as wds

    manifest, _ = _write_set(tmp_path)
    urls = [str(tmp_path / s["name"]) for s in manifest["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None).map(SH.decode_sample)
    got = list(ds)
    assert [s["meta"]["index"] for s in got] == list(range(10))
    t = C.decode(got[3], "topk", V, 4)
    assert t.ids.shape[0] == got[3]["meta"]["num_masked"]


def test_a_failed_shard_is_never_published(tmp_path):
    header = _header()
    plan = SH.ShardPlan(10, 4)
    SH.start_set(tmp_path, header)
    with pytest.raises(RuntimeError, match="boom"):
        with SH.ShardWriter(tmp_path, plan, 0, 0, SH.header_digest(header)) as w:
            w.add(0, *_example(0))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "progress"]
    w = SH.ShardWriter(tmp_path, plan, 1, 0, SH.header_digest(header))
    with pytest.raises(SH.ShardError, match="out of order"):
        w.add(5, *_example(5))
    with pytest.raises(SH.ShardError, match="0 samples written, the plan says 4"):
        w.finish()
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob(".*tmp"))


def test_completion_records_and_leftovers(tmp_path):
    header = _header()
    digest = SH.header_digest(header)
    _write_set(tmp_path)
    assert SH.completed(tmp_path, 0, digest)["samples"] == 4
    assert SH.completed(tmp_path, 0, "other-plan") is None
    name = SH.completed(tmp_path, 1, digest)["name"]
    with open(tmp_path / name, "r+b") as f:  # grown / truncated / altered -> not complete
        f.truncate(1024)
    assert SH.completed(tmp_path, 1, digest) is None
    (tmp_path / ".targets-0000-000009.tar.tmp").write_bytes(b"half")
    (tmp_path / "progress" / ".shard-000009.json.x.tmp").write_text("{")
    removed = SH.remove_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".shard-000009.json.x.tmp", ".targets-0000-000009.tar.tmp"]


def test_manifest_needs_every_shard_and_the_same_settings(tmp_path):
    _write_set(tmp_path)
    (tmp_path / "progress" / "shard-000002.json").unlink()
    with pytest.raises(SH.ShardError, match=r"1 of 3 shards are missing or incomplete \(shard 2\)"):
        SH.write_manifest(tmp_path, _header(), SH.ShardPlan(10, 4))
    with pytest.raises(SH.ShardError, match="codec: stored 'topk', expected 'dense'"):
        SH.start_set(tmp_path, _header(codec="dense"))


def test_a_redone_shard_replaces_a_copy_from_another_rank(tmp_path):
    _write_set(tmp_path, rank_of=lambda j: 1)
    header, plan = _header(), SH.ShardPlan(10, 4)
    (tmp_path / "progress" / "shard-000000.json").unlink()  # as if the record were lost
    with SH.ShardWriter(tmp_path, plan, 0, 0, SH.header_digest(header)) as w:
        for i in plan.indices(0):
            w.add(i, *_example(i))
        w.finish()
    assert sorted(p.name for p in tmp_path.glob("*-000000.tar")) == ["targets-0000-000000.tar"]


# --------------------------------------------------------------------------------------------------
# Verification, inspect_shards
# --------------------------------------------------------------------------------------------------
def test_verify_names_truncated_flipped_and_missing_shards(tmp_path):
    manifest, _ = _write_set(tmp_path, num_samples=16, per_shard=4)
    assert SH.verify(tmp_path) == []
    names = [s["name"] for s in manifest["shards"]]
    with open(tmp_path / names[0], "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) - 700)
    data = bytearray((tmp_path / names[1]).read_bytes())
    data[1500] ^= 0x04
    (tmp_path / names[1]).write_bytes(bytes(data))
    (tmp_path / names[3]).unlink()
    bad = {b.name: b.reason for b in SH.verify(tmp_path)}
    assert set(bad) == {names[0], names[1], names[3]}
    assert "truncated" in bad[names[0]] and "sha256" in bad[names[1]] and bad[names[3]] == "missing"
    (tmp_path / "manifest.json").unlink()
    assert SH.verify(tmp_path)[0].name == "manifest.json"


def test_inspect_shards_cli(tmp_path, capsys):
    # The tool's own main() in this process (the fast suite starts no process), with its exit code.
    manifest, _ = _write_set(tmp_path)
    assert inspect_shards.main([str(tmp_path), "--verify"]) == 0
    ok = capsys.readouterr()
    assert "10 in 3 shards" in ok.out and "tail mass" in ok.out and "all 3 shards match" in ok.out
    assert "bytes/position: payload" in ok.out
    name = manifest["shards"][2]["name"]
    data = bytearray((tmp_path / name).read_bytes())
    data[100] ^= 0xFF
    (tmp_path / name).write_bytes(bytes(data))
    assert inspect_shards.main([str(tmp_path), "--verify"]) == 1
    bad = capsys.readouterr()
    assert f"BAD {name}" in bad.out and name in bad.out


def test_sampled_set_summary(tmp_path):
    manifest, _ = _write_set(tmp_path, codec="sampled")
    assert manifest["totals"]["distinct_mean"] > 0
    assert any("distinct" in line for line in SH.summarize(tmp_path))
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
