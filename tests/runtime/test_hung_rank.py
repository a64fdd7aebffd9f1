"""A hung rank ends the job (engine.collective_timeout_s): a real two-process pretrain job under
torchrun (DeepSpeed ZeRO over gloo), one rank stopped with SIGSTOP mid-training. The other rank's
next collective fails after the timeout with one clear line, the job exits non-zero, and torchrun
tears the stopped rank down (SIGTERM, then SIGKILL after its grace period) instead of the job
waiting for torch's default of 30 minutes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster.pipeline import free_port
from tests.helpers import FAST, REPO, TINY, env
from trainer.layout import EXIT_HUNG

TIMEOUT_S = 10


def _rank_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (children of the launcher, by their RANK)."""
    out = {}
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = pid
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_stopped_rank_ends_the_job_with_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "trainer.jobs.pretrain", "--run-dir", str(run), "--config",
           str(TINY), *FAST, "train.steps=100000", "train.ckpt_every=100000", "train.eval_every=100000",
           "train.log_every=1", f"engine.collective_timeout_s={TIMEOUT_S}"]
    err = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    ranks: dict[int, int] = {}
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().count('"train/loss"') >= 3):  # training, both ranks in step
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "pretraining did not start within 300 s"
            time.sleep(0.2)
        ranks = _rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGSTOP)
        t0 = time.monotonic()
        rc = proc.wait(timeout=TIMEOUT_S + 120)  # the timeout, then torchrun's 30 s grace before SIGKILL
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in ranks.values():  # a failed test leaves no stopped rank behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    err.seek(0)
    text = err.read()
    # (tqdm's progress bar ends without a newline: the line follows it)
    lines = [ln[ln.index("error (rank 0)"):] for ln in text.splitlines() if "error (rank 0)" in ln]
    assert rc != 0
    assert len(lines) == 1, text[-4000:]
    assert lines[0].startswith(f"error (rank 0): a collective operation waited longer than "
                               f"engine.collective_timeout_s={TIMEOUT_S} s: another rank hangs or died"), lines
    assert f"exitcode: {EXIT_HUNG}" in text  # torchrun's record of rank 0's exit code
    assert not _alive(ranks[1]), "torchrun left the stopped rank behind"
    print(f"stopped rank 1; the job ended {waited:.1f} s later (timeout {TIMEOUT_S} s)")
