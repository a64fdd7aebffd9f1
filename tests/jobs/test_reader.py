"""trainer/targets/reader.py on a real target set (the targets job on a tiny random teacher): the order
uses every sample once per epoch and resumes exactly, the reader splits over ranks and DataLoader
workers without changing it, the manifest and checksums are checked."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import G, N, base_run
from trainer.config import ConfigError
from trainer.method import codecs
from trainer.targets import header, reader
from trainer.targets import shards as SH


@pytest.fixture(scope="module")
def tset(tmp_path_factory) -> Path:
    return base_run(tmp_path_factory) / "round_1" / "targets"


@pytest.fixture(scope="module")
def manifest(tset) -> dict:
    return SH.read_manifest(tset)


# --------------------------------------------------------------------------------------------------
# The order (pure)
# --------------------------------------------------------------------------------------------------
def test_order_uses_every_sample_once_per_epoch_and_resumes_exactly():
    # Uneven shards (the last one short) and parts that cut shards in the middle.
    units = [reader.Unit(f"s{j}", 32 * j, 32) for j in range(7)] + [reader.Unit("s7", 224, 20)]
    order = reader.SampleOrder(units, streams=4, seed=0, round_idx=1)
    total = 244
    for p in range(4):
        seq = order.take(p, 0, 3 * order.part_size(p))
        # any start position replays the tail of the uninterrupted stream
        for q in (0, 5, order.part_size(p) - 1, order.part_size(p) + 7):
            assert order.take(p, q, 13) == seq[q:q + 13]
    for epoch in range(3):
        seen = [i for p in range(4) for i, e in order.take(p, epoch * order.part_size(p), order.part_size(p))
                if e == epoch]
        assert sorted(seen) == list(range(total)), epoch
    assert order.permutation(0).tolist() != order.permutation(1).tolist()  # a new shard order per epoch
    other = reader.SampleOrder(units, streams=4, seed=0, round_idx=2)
    assert other.take(0, 0, 40) != order.take(0, 0, 40)  # and per round


def test_resampled_stream_is_deterministic_and_resumable():
    units = [reader.Unit(f"s{j}", 10 * j, 10) for j in range(5)]
    order = reader.SampleOrder(units, streams=2, seed=3, round_idx=1, resample=True)
    seq = order.take(1, 0, 200)
    assert order.take(1, 37, 50) == seq[37:87]
    assert reader.SampleOrder(units, 2, 3, 1, resample=True).take(1, 0, 200) == seq
    assert all(i % 10 == 0 for i, _ in seq[::10])  # whole shards, from their start
    assert seq != order.take(0, 0, 200)


def test_geometry_names_the_key():
    assert reader.geometry(16, 2, 1, 0, 0) == reader.Geometry(2, 8, range(1, 2))
    assert reader.geometry(16, 2, 0, 0, 2) == reader.Geometry(4, 4, range(0, 2))
    with pytest.raises(ConfigError, match="distill.streams"):
        reader.geometry(16, 2, 0, 3, 0)
    with pytest.raises(ConfigError, match="distill.loader_workers"):
        reader.geometry(16, 2, 0, 4, 3)
    with pytest.raises(ConfigError, match="distill.global_batch_size"):
        reader.geometry(15, 2, 0, 0, 0)


# --------------------------------------------------------------------------------------------------
# Reading real shards
# --------------------------------------------------------------------------------------------------
def _read(tset, order, geo, steps, workers, start=0) -> list[list[dict]]:
    rank_reader = reader.RankReader(tset, order, geo, workers)
    try:
        return [rank_reader.batch(k) for k in range(start, start + steps)]
    finally:
        rank_reader.close()


def test_reader_splits_over_ranks_and_workers_each_sample_once_per_epoch(tset, manifest):
    units = reader.units_of(manifest)
    steps = N // G  # one epoch
    per_rank: dict[int, list[list[int]]] = {}
    for rank in range(2):
        geo = reader.geometry(G, 2, rank, 0, 2)  # 2 ranks x 2 workers: 4 streams of 4 samples per step
        order = reader.SampleOrder(units, geo.streams, seed=0, round_idx=1)
        batches = _read(tset, order, geo, steps, workers=2)
        per_rank[rank] = [[int(s["meta"]["index"]) for s in b] for b in batches]
        # the pure order says what to expect, and the main process reads the same without workers
        assert per_rank[rank] == [[i for i, _ in order.step_indices(geo, k)] for k in range(steps)]
        assert [[int(s["meta"]["index"]) for s in b] for b in _read(tset, order, geo, 3, 0, start=5)] == \
            per_rank[rank][5:8]  # a restart at step 5, in the middle of shards
        for b in batches[:2]:  # samples are whole: xt, codec fields, meta
            for s in b:
                assert s["xt"].shape == (64,) and s["ids"].shape == (int((s["xt"] == 64).sum()), 8)
    every = sorted(i for r in per_rank.values() for b in r for i in b)
    assert every == list(range(N))  # each sample exactly once in the epoch, across both ranks
    assert len(per_rank[0][0]) == len(per_rank[1][0]) == G // 2


def test_collated_targets_line_up_with_the_student_rows(tset, manifest):
    geo = reader.geometry(G, 1, 0, 0, 0)
    order = reader.SampleOrder(reader.units_of(manifest), geo.streams, 0, 1)
    samples = _read(tset, order, geo, 1, 0)[0]
    xt, t, fields = reader.collate_fields(samples, "topk", 64, 64)
    targets = codecs.decode(fields, "topk", 64, 8)
    student = torch.zeros(G, 64, 65)[xt == 64]  # the student's rows: DiT(rows=xt == MASK)
    assert student.shape[0] == targets.ids.shape[0] == int((xt == 64).sum())
    assert torch.equal(t, torch.tensor([s["meta"]["t"] for s in samples], dtype=torch.float32))
    broken = dict(samples[0], logtail=samples[0]["logtail"][:-1])
    with pytest.raises(SH.ShardError, match="coded positions"):
        reader.collate_fields([broken], "topk", 64, 64)


# --------------------------------------------------------------------------------------------------
# Manifest and checksums
# --------------------------------------------------------------------------------------------------
def _expected(manifest: dict, **changes) -> dict:
    keys = ("round", "seq_len", "vocab_size", "tokenizer", "codec", "k", "teacher_sha256", "teacher_weights")
    return {k: manifest[k] for k in keys} | changes


WHY = {"teacher_sha256": "sha256 of the student's init"}


@pytest.mark.parametrize("field,value", [("teacher_sha256", "0" * 64), ("seq_len", 32), ("vocab_size", 50257),
                                         ("round", 2), ("tokenizer", "gpt2"), ("teacher_weights", "raw")])
def test_manifest_mismatch_names_the_field_and_both_values(manifest, field, value):
    header.check(manifest, _expected(manifest), "m.json", "rkl", WHY)  # its own values pass
    with pytest.raises(header.ManifestMismatch) as e:
        header.check(manifest, _expected(manifest, **{field: value}), "m.json", "rkl", WHY)
    assert f"field '{field}'" in str(e.value) and repr(manifest[field]) in str(e.value) and repr(value) in str(e.value)


def test_manifest_codec_must_serve_the_divergence(manifest):
    sampled = dict(manifest, codec="sampled")
    with pytest.raises(header.ManifestMismatch, match="field 'codec'.*cannot be computed"):
        header.check(sampled, {}, "m.json", "rkl")
    header.check(sampled, {}, "m.json", "fkl")


def test_bad_checksum_fail_names_the_shard_and_skip_counts_it(tset, manifest, tmp_path):
    out = tmp_path / "targets"
    shutil.copytree(tset, out)
    bad_name = manifest["shards"][3]["name"]
    data = bytearray((out / bad_name).read_bytes())
    data[2000] ^= 0xFF  # one flipped byte: same size, other sha256
    (out / bad_name).write_bytes(bytes(data))
    assert reader.verify_shards(tset, manifest, "fail") == []
    with pytest.raises(SH.ShardError, match=f"{out / bad_name}: sha256 .*corrupt"):
        reader.verify_shards(out, manifest, "fail")
    bad = reader.verify_shards(out, manifest, "skip")
    assert [b.name for b in bad] == [bad_name]
    units = reader.units_of(manifest, [b.name for b in bad])
    order = reader.SampleOrder(units, 2, 0, 1)
    seen = sorted(i for p in range(2) for i, _ in order.take(p, 0, order.part_size(p)))
    assert seen == [i for i in range(N) if not 96 <= i < 128]  # shard 3's samples are left out
    (out / manifest["shards"][5]["name"]).write_bytes(data[:1000])  # truncated
    assert [b.reason.split(" ")[0] for b in reader.verify_shards(out, manifest, "skip")] == ["sha256", "size"]
    with pytest.raises(ConfigError, match="targets.verify"):
        reader.verify_shards(out, manifest, "maybe")


def test_meta_index_mismatch_is_named(tset, manifest, tmp_path):
    """A shard whose content is not what the manifest places there (e.g. renamed) is refused."""
    out = tmp_path / "targets"
    shutil.copytree(tset, out)
    a, b = manifest["shards"][0]["name"], manifest["shards"][1]["name"]
    os.replace(out / a, out / "x.tar")
    os.replace(out / b, out / a)
    unit = reader.units_of(manifest)[0]
    with pytest.raises(SH.ShardError, match=f"{a}: sample 0 is key '0000000032'"):
        next(reader.read_segment(out, unit, reader.Segment(0, 0, 32, 0)))
