"""teacher.source=oracle through the real jobs: the exact teacher's export, its evaluation with the
ideal student's rows, a target set and a round-1 student distilled from it (from scratch: no
teacher.init_from), and the report's comparison against the ceiling."""
import json

from tests.helpers import run_job
from trainer.model.oracle import KIND
from trainer.runtime.checkpoint import read_json

SMALL = ["model.vocab_size=8", "data.synthetic.vocab_size=8", "data.synthetic.branching=2", "data.seq_len=16",
         "model.max_seq_len=16", "model.d_model=32", "model.cond_dim=16", "model.n_heads=2",
         "data.num_train_sequences=512", "data.num_valid_sequences=32", "teacher.source=oracle",
         "distill.rounds=1", "distill.start_steps=4", "distill.steps_per_round=6", "distill.global_batch_size=8",
         "distill.warmup_steps=1", "train.eval_every=100", "train.ckpt_every=100", "train.log_every=2",
         "targets.num_samples=64", "targets.codec=dense", "targets.samples_per_shard=32", "targets.batch_size=16",
         "eval.steps=[2,4]", "eval.num_samples=64", "eval.batch_size=32", "eval.temperatures=[0.8,1.0]",
         "eval.reference_samples=256", "eval.ideal_rollouts=4"]


def test_exact_teacher_runs_the_round_and_the_report_measures_the_student_against_the_ideal(tmp_path):
    run = tmp_path / "run"
    run_job("trainer.jobs.prepare", run, *SMALL, nproc=1, config=None)
    run_job("trainer.jobs.oracle_teacher", run, nproc=1, config=None)
    assert read_json(run / "teacher" / "export" / "export.json")["model"] == KIND
    scored = read_json(run / "teacher" / "oracle.json")  # its validation bound beside the source's floor
    assert 0 < scored["nll_floor"] < scored["val_nll_bound"] + 0.3 and scored["val_nll_bound"] < 2 * scored["nll_floor"]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(m["tag"] == "val/nll" and m["value"] == scored["val_nll_bound"] for m in logged)

    run_job("trainer.jobs.evaluate", run, "--round", "0", nproc=1, config=None)
    ev = json.loads((run / "teacher" / "eval" / "metrics.json").read_text())
    ideal = ev["ideal"]
    assert ideal["round"] == 1 and ideal["steps"] == 2 and ideal["rollouts"] == 4 and ideal["repeats"] == 2
    assert sorted(r["temperature"] for r in ideal["rows"]) == [0.8, 1.0]
    assert all(len(r["nll_per_sample"]) == 64 and r["nll_mc_se"] >= 0 for r in ideal["rows"])

    run_job("trainer.jobs.targets", run, "--round", "1", nproc=1, config=None)
    run_job("trainer.jobs.distill", run, "--round", "1", nproc=1, config=None)
    record = read_json(run / "round_1" / "student" / "distill.json")
    assert record["init"]["from"] == "scratch" and record["teacher_weights"] == "ema"
    # the control starts where the student did (no teacher weights to continue)
    proc = run_job("trainer.jobs.pretrain", run, "--control", "distill.control=true", nproc=1, config=None)
    assert "control starts from a random init (seed 0)" in proc.stderr + proc.stdout
    assert read_json(run / "control" / "export" / "export.json")["model"] == "dit"
    run_job("trainer.jobs.evaluate", run, "--round", "1", nproc=1, config=None)
    run_job("trainer.jobs.report", run, nproc=1, config=None)
    report = json.loads((run / "report.json").read_text())
    c = report["comparisons"][0]
    assert c["round_teacher"] == "teacher" and c["ideal_nll"]["mc_se"] is not None
    assert c["ideal_gain"]["se"] > 0 and c["achieved_gain"] is not None
    assert "Against the ceiling" in (run / "report.md").read_text()
