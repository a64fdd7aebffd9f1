"""tools/submit.py --local when something is wrong: a failing stage is reported with the error line the
job wrote (not only its log's path), and a run folder that is a file is one line, exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cluster.pipeline import last_error_line
from tests.helpers import REPO, TINY, env


def submit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "submit.py"), *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)


def test_a_failing_stage_prints_its_own_error_line(tmp_path: Path) -> None:
    (tmp_path / "tok").mkdir()  # exists (the submit-time check passes) but holds no tokenizer
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello world\n")
    run = tmp_path / "run"
    proc = submit("--config", str(TINY), "--local", "--run-dir", str(run), "data.source=text",
                  f"data.paths=[{tmp_path}/corpus/*.txt]", f"data.tokenizer={tmp_path}/tok")
    assert proc.returncode == 2
    expected = (f"error: stage 'prepare' failed with exit code 2: error (rank 0): {tmp_path}/tok: no tokenizer "
                f"files: expected tokenizer.json, or vocab.json and merges.txt; log: {run}/logs/prepare.log")
    assert proc.stderr.strip().splitlines()[-1] == expected, proc.stderr
    assert "Traceback" not in proc.stderr
    state = json.loads((run / "pipeline_state.json").read_text())["stages"]["prepare"]
    assert state["status"] == "failed" and state["reason"].startswith("error (rank 0): ")


def test_the_jobs_line_wins_over_the_launchers_and_earlier_attempts(tmp_path: Path) -> None:
    log = tmp_path / "distill_1.log"
    earlier = "error (rank 0): an earlier attempt's problem\n"
    this = ("step 3 loss 2.1\n"
            "error (rank 1): bad config key 'distill.global_batch_size': 6 is not divisible by the world size 4\n"
            "E1207 03:40:01.123 torch/distributed/elastic/multiprocessing/api.py:874] failed (exitcode: 2)\n"
            "Traceback (most recent call last):\n"
            "  File \"torch/distributed/run.py\", line 9, in main\n"
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    log.write_text(earlier + this)
    assert last_error_line(log, start=len(earlier)) == ("error (rank 1): bad config key 'distill.global_batch_size': "
                                                        "6 is not divisible by the world size 4")
    # no line of the job's own: the last unindented error line, never an indented traceback frame
    log.write_text("ok\nRuntimeError: CUDA out of memory\n  File \"x.py\", line 1, in error_handler\n")
    assert last_error_line(log) == "RuntimeError: CUDA out of memory"
    assert last_error_line(tmp_path / "missing.log") == ""


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "results.txt"
    not_a_folder.write_text("keep me\n")
    for args in (["--config", str(TINY), "--local", "--run-dir", str(not_a_folder)],
                 ["--config", str(TINY), "--dry-run", "--run-dir", str(not_a_folder)],
                 ["--status", str(not_a_folder)]):
        proc = submit(*args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert f"{not_a_folder} exists and is not a folder" in proc.stderr
    assert not_a_folder.read_text() == "keep me\n"  # untouched
