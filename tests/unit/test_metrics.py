"""trainer/runtime/metrics.py: TensorBoard + JSONL writer, throughput and data-wait meters."""
from __future__ import annotations

import json

import pytest

from tests.helpers import read_tb_scalars
from trainer.config import RunConfig
from trainer.runtime import metrics
from trainer.runtime.metrics import DataWaitTimer, MetricsWriter, Throughput


def test_writer_tb_and_jsonl(tmp_path):
    with MetricsWriter(tmp_path, enabled=True) as w:
        w.config(RunConfig(name="m"))
        for step in (10, 20, 30):
            w.scalars(step, {"train/loss": 1.0 / step, "train/lr": 1e-3})
        w.scalars(40, {"train/loss": float("nan")})
        w.text(40, "samples", "hello")
    got = read_tb_scalars(tmp_path / "tb")
    assert set(got) == {"train/loss", "train/lr"}
    assert [s for s, _ in got["train/loss"]] == [10, 20, 30, 40]
    assert got["train/loss"][1][1] == pytest.approx(0.05)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and set(rows[0]) == {"step", "tag", "value", "time"}
    assert rows[0]["tag"] == "train/loss" and rows[0]["value"] == pytest.approx(0.1) and rows[-1]["value"] == "nan"


def test_writer_appends_across_restarts(tmp_path):
    for step in (1, 2):
        with MetricsWriter(tmp_path, enabled=True) as w:
            w.scalars(step, {"x": step})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert [s for s, _ in read_tb_scalars(tmp_path / "tb")["x"]] == [1, 2]


def test_disabled_writer_is_a_no_op(tmp_path):
    w = MetricsWriter(tmp_path / "run", enabled=False)
    w.config(RunConfig()), w.scalars(1, {"x": 1.0}), w.text(1, "t", "s"), w.flush(), w.close()
    assert not (tmp_path / "run").exists()


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_throughput_and_data_wait(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    tp = Throughput()
    tp.add(samples=8, tokens=512)
    tp.add(samples=8, tokens=512)
    clock.t += 2.0
    assert tp.rates() == {"tokens_per_s": 512.0, "samples_per_s": 8.0}
    clock.t += 1.0
    assert tp.rates()["samples_per_s"] == 0.0  # reset after reading

    timer = DataWaitTimer()

    def loader():
        for i in range(4):
            clock.t += 0.25  # fetching takes 0.25 s
            yield i

    batches = loader()
    for _ in range(4):
        with timer.waiting():
            next(batches)
        clock.t += 0.75  # the step takes 0.75 s
    assert timer.fraction() == pytest.approx(0.25)
    with timer.waiting():
        clock.t += 1.0
    assert timer.fraction() == pytest.approx(1.0)
