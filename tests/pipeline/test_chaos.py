"""tools/chaos.py, the short variant CI affords: the shortened tiny pipeline (tests/helpers/
PIPELINE_OVERRIDES) killed with SIGKILL (whole process trees) in four stages and resubmitted after
each kill, then compared with the session's uninterrupted run of the same config (the
``local_pipeline`` fixture): every export, targets manifest, evaluation and report.json identical.
The full runs (20+ kills in every stage of the tiny chain) are in docs/reliability.md."""
import json
import subprocess
import sys

from tests.helpers import PIPELINE_OVERRIDES, REPO, TINY, env

# A training stage, the sharded targets job (its shards published one by one), the distillation
# (a resumed student) and the report: each must resume, and the run must still match.
STAGES = ("teacher", "targets_1", "distill_2", "report")


def test_a_chain_killed_in_four_stages_matches_the_uninterrupted_run(local_pipeline, tmp_path):
    reference = local_pipeline.wait()
    proc = subprocess.run(
        [sys.executable, "tools/chaos.py", "--work", str(tmp_path), "--reference", str(reference),
         "--config", str(TINY), "--no-chaos-overrides", "--kills", str(len(STAGES)), "--stages", ",".join(STAGES),
         "--seed", "0", *PIPELINE_OVERRIDES],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = json.loads((tmp_path / "chaos-0.json").read_text())
    assert summary["identical"] and summary["differences"] == {}, out[-6000:]
    assert summary["kills"] == len(STAGES) and summary["resubmissions"] == len(STAGES)
    assert all(summary["kills_per_stage"][s] == 1 for s in STAGES), summary["kills_per_stage"]
    # every product of the chain was compared: 3 models x 2 weight files, 2 target sets, 3 evaluations,
    # the report and the prepared data
    compared = summary["products_compared"]
    assert sum(p.endswith(".safetensors") for p in compared) == 6
    assert {"round_1/targets/manifest.json", "round_2/targets/manifest.json", "report.json",
            "data/data.json"} <= set(compared)
    assert "identical: yes" in proc.stdout
