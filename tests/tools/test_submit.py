"""tools/submit.py before anything is queued: sbatch's time grammar, per-stage resources, paths
resolved against the submitting directory, site hooks, and the --dry-run budget (checked against a
hand computation). Runs the real tool as a user would (a subprocess, --dry-run); no SLURM needed."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import pipeline
from cluster.budget import budget, model_state_bytes
from cluster.resources import ClusterSpec, stage_resources
from tests.helpers import REPO, TINY, env
from trainer.config import ConfigError, load_config, parse_slurm_time, resolve_paths, save_config
from trainer.evaluation.sweep import eval_plan

SMALL = REPO / "configs" / "small.yaml"


def submit(*args: str, cwd: Path = REPO, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "submit.py"), *args], cwd=cwd,
                          env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=120)


def _tool():
    spec = importlib.util.spec_from_file_location("submit_tool", REPO / "tools" / "submit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sbatch_of(out: str, stage: str) -> str:
    m = re.search(rf"^\[{stage}\] .*\n.*\n  #SBATCH (.*)$", out, re.M)
    assert m, out
    return m.group(1)


# --------------------------------------------------------------------------------------------------
# --time: sbatch's grammar
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, minutes", [
    ("30", 30), ("30:00", 30), ("30:01", 31), ("4:00:00", 240), ("04:00:00", 240), ("1-12", 36 * 60),
    ("1-0:30", 24 * 60 + 30), ("2-00:00:00", 48 * 60), ("0:90", 2), ("90", 90)])
def test_time_follows_sbatch(text: str, minutes: int) -> None:
    assert parse_slurm_time(text) == minutes


@pytest.mark.parametrize("text", ["abc", "1:2:3:4", "1-", "-5", "1h", "0", "00:00", ""])
def test_bad_time_names_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match=r"bad flag '--time'"):
        parse_slurm_time(text)


def test_time_30_00_is_30_minutes_in_the_job_request() -> None:
    proc = submit("--config", str(TINY), "--nodes", "1", "--time", "30:00", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "--time=00:30:00" in sbatch_of(proc.stdout, "teacher")
    bad = submit("--config", str(TINY), "--time", "thirty", "--dry-run")
    assert bad.returncode == 2 and "bad flag '--time': 'thirty' is not a SLURM time" in bad.stderr


# --------------------------------------------------------------------------------------------------
# One place for launch options: the flags write slurm.* keys
# --------------------------------------------------------------------------------------------------
def test_launch_flags_are_the_slurm_keys_they_name() -> None:
    """Each flag sets its slurm.* key (an empty one keeps the config's); --sbatch entries win over the
    config's slurm.additional; ClusterSpec keeps only the allocation's shape."""
    tool = _tool()
    cfg = load_config(TINY, ["slurm.partition=cfg", "slurm.account=acct", "slurm.additional.comment=cfg",
                             "slurm.additional.mem=0"])
    args = tool.parse_args(["--config", str(TINY), "--nodes", "2", "--gpus-per-node", "4", "--tasks-per-node", "3",
                            "--partition", "gpu", "--account", "", "--qos", "high", "--constraint", "h100",
                            "--exclude", "n[1-2]", "--reservation", "r", "--time", "1-12",
                            "--sbatch", "exclusive=", "--sbatch", "comment=flag"])
    launch = tool.launch_config(args, cfg)
    by_keys = load_config(TINY, ["slurm.partition=gpu", "slurm.account=acct", "slurm.qos=high",
                                 "slurm.constraint=h100", "slurm.exclude=n[1-2]", "slurm.reservation=r",
                                 "slurm.time_min=2160", "slurm.gpus_per_node=4", "slurm.additional.mem=0",
                                 "slurm.additional.comment=flag"])
    assert launch.slurm == tool.dataclasses.replace(by_keys.slurm, additional={**by_keys.slurm.additional,
                                                                               "exclusive": ""})
    assert list(launch.slurm.additional) == ["comment", "mem", "exclusive"]  # the sbatch lines' order
    assert launch.model == cfg.model and cfg.slurm.partition == "cfg"  # the given config is left as it was
    assert tool.cluster_spec(args, launch) == ClusterSpec(nodes=2, gpus_per_node=4, cpu_slots_per_node=3)
    no_flags = tool.parse_args(["--config", str(TINY)])
    assert tool.launch_config(no_flags, cfg) is cfg


# --------------------------------------------------------------------------------------------------
# Per-stage resources, job names, site hooks
# --------------------------------------------------------------------------------------------------
def test_small_on_8_nodes_prints_resources_and_budget_and_names_the_missing_tokenizer() -> None:
    proc = submit("--config", str(SMALL), "--nodes", "8", "--dry-run")
    out = proc.stdout
    # The shipped config points at a tokenizer folder the repository does not hold: the plan and the
    # budget print, then the problem, naming the key, and a non-zero exit.
    assert proc.returncode == 2
    assert "bad config key 'data.tokenizer': 'tokenizers/gpt2' does not exist" in proc.stderr
    for stage in ("prepare", "report"):
        line = sbatch_of(out, stage)
        assert "--gpus-per-node" not in line and "gres" not in line, line
        assert re.search(rf"^\[{stage}\] 1 x 1 tasks, no GPU", out, re.M)
    assert "--gpus-per-node=8" in sbatch_of(out, "teacher") and "--nodes=8" in sbatch_of(out, "teacher")
    assert "--gpus-per-node=1" in sbatch_of(out, "eval_3")
    assert "--job-name=small-distill_2" in sbatch_of(out, "distill_2")
    assert "--time=00:30:00" in sbatch_of(out, "report")
    assert "--kill-on-invalid-dep=yes" in sbatch_of(out, "distill_2")
    assert "GPU-hours reserved: 3,872.0 per attempt" in out  # 15 x 64 x 4 h + 8 evals x 1 x 4 h
    assert re.search(r"target storage: 58\.\d GB per round, 406\.\d GB for 7 rounds", out), out


def test_stage_overrides_time_nodes_gpus_partition() -> None:
    cfg = load_config(TINY, ["slurm.stages.eval.time=1-00:00:00", "slurm.stages.eval.gpus_per_node=2",
                             "slurm.stages.distill.nodes=1", "slurm.stages.prepare.partition=cpu",
                             "slurm.constraint=h100", "slurm.stages.prepare.constraint=none",
                             "slurm.mem_gb_per_task=0", "slurm.time_min=90"])
    spec = ClusterSpec(nodes=2, gpus_per_node=4)
    res = {s.name: stage_resources(s, cfg, spec, "myrun") for s in pipeline.build_chain(cfg)}
    assert (res["eval_1"].time_min, res["eval_1"].gpus_per_node, res["eval_1"].nodes) == (1440, 2, 1)
    assert (res["distill_2"].nodes, res["distill_2"].tasks_per_node) == (1, 4)
    assert (res["teacher"].nodes, res["teacher"].time_min) == (2, 90)
    assert res["prepare"].extra["partition"] == "cpu" and res["prepare"].gpus_per_node == 0
    assert "constraint" not in res["prepare"].extra and res["teacher"].extra["constraint"] == "h100"
    assert res["teacher"].job_name == "myrun-teacher"
    assert "--mem=0" in res["teacher"].sbatch_lines()


def test_a_stage_of_its_own_name_wins_over_its_kind() -> None:
    """slurm.stages.eval_0 sizes the teacher's evaluation (it sweeps every round's count); the other
    evaluations keep slurm.stages.eval."""
    cfg = load_config(TINY, ["slurm.stages.eval.time=30:00", "slurm.stages.eval_0.time=2:00:00"])
    res = {s.name: stage_resources(s, cfg, ClusterSpec(nodes=1, gpus_per_node=1)) for s in pipeline.build_chain(cfg)}
    assert (res["eval_0"].time_min, res["eval_1"].time_min, res["eval_control"].time_min) == (120, 30, 30)
    with pytest.raises(ConfigError, match=r"bad config key 'slurm.stages.eval_0.time'"):
        load_config(TINY, ["slurm.stages.eval_0.time=1"])


def test_eval_plans_follow_what_each_evaluation_samples() -> None:
    """The teacher and the final control sweep every round's count, a student its own plus eval.steps,
    the control matched to round r (eval_control_r) round r's count only (trainer/evaluation/sweep.py,
    what trainer/jobs/evaluate.py draws); the budget reads each stage's (round, control) off its arguments."""
    from cluster.budget import evaluated_model

    cfg = load_config(TINY, ["eval.steps=[8,64]", "eval.temperatures=[0.9]", "distill.start_steps=64",
                             "distill.rounds=2", "distill.control=true"])
    plans = {st.name: eval_plan(cfg, *evaluated_model(st)) for st in pipeline.build_chain(cfg)
             if st.module == "trainer.jobs.evaluate"}
    at_1 = {(8, 1.0), (16, 1.0), (32, 1.0), (64, 1.0)}  # eval.steps and every round's count
    assert plans["eval_0"] == plans["eval_control"] == at_1 | {(32, 0.9), (16, 0.9)}
    assert plans["eval_2"] == at_1 | {(16, 0.9)}
    assert plans["eval_control_1"] == {(32, 1.0), (32, 0.9)}
    # a model that teaches the next round's ideal student (eval.ideal_rollouts) also sweeps that count
    ideal = load_config(TINY, ["eval.steps=[8,64]", "eval.temperatures=[0.9]", "distill.start_steps=64",
                               "distill.rounds=2", "eval.ideal_rollouts=2"])
    assert eval_plan(ideal, 1, False) == at_1 | {(32, 0.9), (16, 0.9)} and eval_plan(ideal, 2, False) == plans["eval_2"]


def test_unquoted_times_keep_sbatchs_meaning(tmp_path: Path) -> None:
    """YAML 1.1 would read 30:00 as 1800 and 1:00:00 as 3600 (base 60): not here."""
    cfg_file = tmp_path / "site.yaml"
    cfg_file.write_text("slurm:\n  stages:\n    eval: {time: 30:00}\n    distill:\n      time: 1:00:00  # one hour\n")
    cfg = load_config(cfg_file, ["slurm.stages.report.time=45:00"])
    st = cfg.slurm.stages
    assert (st["eval"].time, st["distill"].time, st["report"].time) == ("30:00", "1:00:00", "45:00")
    spec = ClusterSpec(nodes=1, gpus_per_node=1)
    res = {s.name: stage_resources(s, cfg, spec) for s in pipeline.build_chain(cfg)}
    assert (res["eval_1"].time_min, res["distill_1"].time_min, res["report"].time_min) == (30, 60, 45)


def test_bad_stage_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"bad config key 'slurm.stages.evaluate'"):
        load_config(TINY, ["slurm.stages.evaluate.time=30"])
    with pytest.raises(ConfigError, match=r"bad config key 'slurm.stages.eval.time'.*'half an hour'"):
        load_config(TINY, ["slurm.stages.eval.time=half an hour"])
    with pytest.raises(ConfigError, match=r"bad config key 'slurm.stages.eval.time'.*USR2"):
        load_config(TINY, ["slurm.stages.eval.time=1"])  # 1 minute < the 120 s signal lead


def test_site_hooks_reach_the_dry_run() -> None:
    proc = submit("--config", str(TINY), "--nodes", "2", "--gpus-per-node", "4", "--constraint", "h100",
                  "--exclude", "n[3-4]", "--reservation", "big", "--sbatch", "exclusive=", "--sbatch", "comment=sdtt",
                  "--dry-run", "slurm.setup=[module load cuda/12.4, source ~/venv/bin/activate]",
                  "slurm.env_from_shell=[NCCL_*]", "slurm.env={NCCL_DEBUG: WARN}",
                  extra_env={"NCCL_SOCKET_IFNAME": "ib0", "NCCL_DEBUG": "INFO"})
    assert proc.returncode == 0, proc.stderr
    line = sbatch_of(proc.stdout, "distill_1")
    for flag in ("--constraint=h100", "--exclude=n[3-4]", "--reservation=big", "--exclusive", "--comment=sdtt"):
        assert flag in line.split(), (flag, line)
    assert "job setup: module load cuda/12.4" in proc.stdout
    assert "job environment: NCCL_SOCKET_IFNAME=ib0" in proc.stdout
    assert "job environment: NCCL_DEBUG=WARN" in proc.stdout  # a fixed value wins over the shell's
    bad = submit("--config", str(TINY), "--sbatch", "exclusive", "--dry-run")
    assert bad.returncode == 2 and "bad flag '--sbatch': 'exclusive' is not KEY=VALUE" in bad.stderr


def test_executor_gets_the_setup_environment_and_kill_on_invalid_dep(tmp_path: Path) -> None:
    from cluster.submission import executor_parameters

    cfg = load_config(TINY, ["slurm.setup=[module load nccl]", "slurm.additional={exclusive: ''}"])
    st = pipeline.build_chain(cfg)[1]
    res = stage_resources(st, cfg, ClusterSpec(nodes=1, gpus_per_node=2), "r")
    params = executor_parameters(res, cfg, tmp_path, ["17"], {"NCCL_DEBUG": "WARN"})
    assert params["setup"][:2] == ["module load nccl", "export NCCL_DEBUG=WARN"]
    assert params["setup"][-1] == f"cd {tmp_path}"
    add = params["additional_parameters"]
    assert add["dependency"] == "afterok:17" and add["kill_on_invalid_dep"] == "yes" and add["exclusive"] is True
    assert params["job_name"] == "r-teacher"


def test_srun_args_reach_the_job_step_of_the_script_submitit_writes(tmp_path: Path) -> None:
    """slurm.srun_args (a pyxis container here) in the sbatch script submitit 1.5 writes: on the srun
    line that starts the tasks, after the setup lines, which run outside the container."""
    import submitit

    from cluster.submission import executor_parameters

    image = ["--container-image=/images/sdtt.sqsh", "--container-mounts=/data:/data,/runs:/runs"]
    override = "slurm.srun_args=[" + ",".join(f"'{a}'" for a in image) + "]"
    cfg = load_config(TINY, ["slurm.setup=[module load nccl]", override])
    st = pipeline.build_chain(cfg)[1]
    res = stage_resources(st, cfg, ClusterSpec(nodes=1, gpus_per_node=2), "r")
    ex = submitit.SlurmExecutor(folder=tmp_path / "logs")
    ex.update_parameters(**executor_parameters(res, cfg, tmp_path, [], {}))
    script = ex._make_submission_file_text("python -u -m submitit.core._submit x", "uid").splitlines()
    srun = [line for line in script if line.startswith("srun ")]
    assert len(srun) == 1 and srun[0].split()[-len(image) - 6:-5] == ["--kill-on-bad-exit=1", *image], srun
    assert script.index("module load nccl") < script.index(srun[0])
    # without it the step is submitit's own plus --kill-on-bad-exit (a failed rank ends the step)
    plain = executor_parameters(res, load_config(TINY), tmp_path, [], {})
    assert plain["srun_args"] == ["--kill-on-bad-exit=1"]
    with pytest.raises(ConfigError, match=r"slurm.srun_args\[0\].*'container-image=x' is not an srun option"):
        load_config(TINY, ["slurm.srun_args=[container-image=x]"])
    proc = submit("--config", str(TINY), "--nodes", "1", "--gpus-per-node", "2", "--dry-run", override)
    step = f"job step: srun ... --kill-on-bad-exit=1 {' '.join(image)}"
    assert proc.returncode == 0 and step in proc.stdout, proc.stderr


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------
def cached_hub_repo(cache: Path, name: str, files=("config.json",), revision: str = "0" * 40) -> Path:
    """A repository in the Hugging Face cache's own layout (models--org--name/refs/main ->
    snapshots/<commit>/...), as `hf download` leaves it; returns the snapshot folder."""
    repo = cache / ("models--" + name.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in files:
        (snap / f).write_text("{}")
    return snap


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_paths_resolve_against_the_submitting_directory(tmp_path: Path, hf_cache: Path) -> None:
    snapshot = cached_hub_repo(hf_cache, "gpt2-large")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello\n")
    (tmp_path / "mdlm").mkdir()
    (tmp_path / "tok").mkdir()
    cfg = load_config(TINY, ["data.source=text", "data.paths=[corpus/*.txt]", "data.tokenizer=tok",
                             "data.cache_dir=cache", "teacher.source=import", "teacher.import_path=./mdlm",
                             "eval.judge=gpt2-large"])
    out, problems = resolve_paths(cfg, tmp_path)
    assert problems == []
    assert out.data.paths == [str(tmp_path / "corpus" / "*.txt")]
    assert out.data.tokenizer == str(tmp_path / "tok") and out.data.cache_dir == str(tmp_path / "cache")
    assert out.teacher.import_path == str(tmp_path / "mdlm")
    assert out.eval.judge == str(snapshot)  # not a path here: a hub name, resolved in the local cache
    (tmp_path / "gpt2-large").mkdir()
    assert resolve_paths(cfg, tmp_path)[0].eval.judge == str(tmp_path / "gpt2-large")  # exists: a path
    # Unused paths are not required; a path-like judge that is missing is an error.
    _, problems = resolve_paths(load_config(TINY, ["eval.judge=./judges/none", "teacher.import_path=nowhere"]),
                                tmp_path)
    assert problems == [f"bad config key 'eval.judge': './judges/none' does not exist (as "
                        f"{tmp_path / 'judges' / 'none'})"]


def test_a_hub_judge_not_cached_is_refused_with_the_command_that_fetches_it(tmp_path: Path, hf_cache: Path) -> None:
    cfg = load_config(TINY, ["eval.judge=openai-community/gpt2-large"])
    _, problems = resolve_paths(cfg, tmp_path)
    assert problems == ["bad config key 'eval.judge': 'openai-community/gpt2-large' is not in the local Hugging "
                        "Face cache; fetch it with: hf download openai-community/gpt2-large --include "
                        "'*.safetensors' --include '*.json' --include '*.txt'"]
    cached_hub_repo(hf_cache, "openai-community/gpt2-large", files=("merges.txt",))  # interrupted download
    _, problems = resolve_paths(cfg, tmp_path)
    assert len(problems) == 1 and "without its config.json (a partial download)" in problems[0]
    # The tool, as a user runs it (its own process, the cache from HF_HUB_CACHE): one line, rc 2, nothing made.
    proc = submit("--config", str(TINY), "--local", "--run-dir", str(tmp_path / "run"), "eval.judge=gpt2-large",
                  extra_env={"HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "'gpt2-large' is not in the local Hugging Face cache; fetch it with: hf download gpt2-large" in proc.stderr
    assert not (tmp_path / "run").exists()
    cached_hub_repo(hf_cache, "gpt2-large")
    proc = submit("--config", str(TINY), "--nodes", "1", "--gpus-per-node", "0", "--dry-run", "eval.judge=gpt2-large",
                  extra_env={"HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr


def test_a_missing_path_fails_at_submit_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text(TINY.read_text())
    proc = submit("--config", "tiny.yaml", "--local", "--run-dir", "run", "teacher.source=import",
                  "teacher.import_path=models/mdlm", cwd=tmp_path)
    assert proc.returncode == 2
    assert f"bad config key 'teacher.import_path': 'models/mdlm' does not exist (as {tmp_path}/models/mdlm)" \
        in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


def test_stored_config_holds_absolute_paths(tmp_path: Path) -> None:
    """A run folder made from another directory stores its paths absolute; the folder's config
    then reloads unchanged from anywhere (the resubmission check compares it)."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "tiny.yaml").write_text(TINY.read_text())
    tool = _tool()
    args = tool.parse_args(["--config", "cfg/tiny.yaml", "--run-dir", "runs/x", "data.cache_dir=shared-data"])
    import os

    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        cfg, run_dir, problems = tool.resolve_config(args)
    finally:
        os.chdir(old)
    assert problems == [] and run_dir == tmp_path / "runs" / "x"
    assert cfg.data.cache_dir == str(tmp_path / "shared-data")


def test_a_list_config_gets_the_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "list.yaml"
    bad.write_text("- name: tiny\n- model: {}\n")
    with pytest.raises(ConfigError, match=r"list.yaml: the top level must be a mapping of sections"):
        load_config(bad)
    proc = submit("--config", str(bad), "--dry-run")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------------
# The budget, against a hand computation
# --------------------------------------------------------------------------------------------------
def test_budget_matches_a_hand_computation() -> None:
    """configs/tiny.yaml on 2 nodes x 4 GPUs, 60 minutes: every number below is worked out by hand
    from the config (tiny.yaml values in the comments); only N comes from the model."""
    tool = _tool()
    cfg = load_config(TINY, ["slurm.time_min=60"])
    spec = ClusterSpec(nodes=2, gpus_per_node=4)
    stages = pipeline.build_chain(cfg)
    n = tool.parameter_count(cfg)
    b = {s.stage: s for s in budget(stages, cfg, spec, n, tool.target_size(cfg), eval_plan=eval_plan).stages}
    # GPU-hours: teacher, 3 targets, 3 distill and the control (distill.control: true) on 8 GPUs for
    # 1 h; eval_0..eval_3, eval_control and control@1, control@2 (eval_control_1, _2) on 1 GPU for 1 h;
    # prepare and report hold no GPU.
    assert b["teacher"].gpu_hours == 8 and b["eval_2"].gpu_hours == 1 and b["prepare"].gpu_hours == 0
    assert b["control"].gpu_hours == 8 and b["eval_control"].gpu_hours == 1 and b["eval_control_2"].gpu_hours == 1
    assert sum(s.gpu_hours for s in b.values()) == 8 * 8 + 7 * 1 == 71
    # tokens: train.steps 1500 x engine.global_batch_size 32 x seq_len 64
    assert b["teacher"].tokens == 1500 * 32 * 64 == 3_072_000
    assert b["teacher"].flop == 6 * n * 3_072_000
    # distill: steps_per_round 300 x distill.global_batch_size 32 x 64; targets: 2048 samples x 64 x m=2
    assert b["distill_1"].tokens == 614_400 and b["targets_1"].tokens == 262_144
    # eval: num_samples 256 x 64 x forward steps: eval.steps (4 + 8 + 16 + 32 + 64) at temperature 1, and
    # the teacher's sweep at every round's count (64 / 2, 64 / 4, 64 / 8) at the other temperatures 0.9, 1.1
    assert b["eval_0"].tokens == 256 * 64 * (124 + 2 * (32 + 16 + 8)) == 3_866_624
    # a student sweeps its own count only: round 2's 16
    assert b["eval_2"].tokens == 256 * 64 * (124 + 2 * 16)
    # ZeRO-2, W = 8, bf16: 2N weights + 2N/8 grads + 12N/8 optimizer + 4N fp32 EMA = 7.75 N
    assert b["teacher"].state_bytes == pytest.approx(7.75 * n)
    assert model_state_bytes(n, 2, 8, True) == pytest.approx(7.75 * n)
    # activations, micro-batch 32 / 8 = 4: 34 x 4 x 64 x d 128 x 2 layers + logits 4 x 64 x 65 x 10 bytes
    assert b["teacher"].activation_bytes == 34 * 4 * 64 * 128 * 2 + 4 * 64 * 65 * 10 == 2_394_624
    # targets: topk_is K=8, V=64 (uint16 ids): 8 x (2 + 2) + 8 x (2 + 2) + 4 = 68 B per masked position;
    # a sample = 4 x 64 (xt) + 32 masked x 68 + 128 (meta json) + 7 members x (512 + 128 + 256) = 8832 B
    assert b["targets_1"].target_bytes == 2048 * 8832 == 18_087_936


def test_targets_keep_false_budget_holds_one_round() -> None:
    tool = _tool()
    for keep, peak_rounds in (("true", 3), ("false", 1)):
        cfg = load_config(TINY, [f"targets.keep={keep}"])
        b = budget(pipeline.build_chain(cfg), cfg, ClusterSpec(nodes=1, gpus_per_node=1), 1000, tool.target_size(cfg),
                   eval_plan=eval_plan)
        assert b.target_bytes_all_rounds == 3 * b.target_bytes_per_round
        assert b.target_bytes_peak == peak_rounds * b.target_bytes_per_round


# --------------------------------------------------------------------------------------------------
# targets.keep: false
# --------------------------------------------------------------------------------------------------
def _fake_round(run: Path, r: int) -> None:
    t = run / f"round_{r}" / "targets"
    (t / "progress").mkdir(parents=True)
    (t / "targets-0000-000000.tar").write_bytes(b"x" * 1000)
    (t / "progress" / "shard-000000.json").write_text("{}")
    (t / "manifest.json").write_text(json.dumps({"round": r}))
    (t / "plan.json").write_text("{}")


def test_targets_are_released_only_after_distill_is_recorded_done(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["targets.keep=false"])
    stages = {s.name: s for s in pipeline.build_chain(cfg)}
    run = tmp_path / "run"
    _fake_round(run, 1)
    targets = run / "round_1" / "targets"
    assert pipeline.release_outputs(run, stages["distill_1"], log=lambda _: None) == []  # not done yet
    assert (targets / "targets-0000-000000.tar").exists()
    for name in ("prepare", "teacher", "targets_1", "distill_1"):  # what the chain has done so far
        product = run / stages[name].product
        product.parent.mkdir(parents=True, exist_ok=True)
        if not product.exists():
            product.write_text("{}")
        pipeline.mark(run, stages[name], "done")
    export = run / "round_1" / "student" / "export"
    assert pipeline.release_outputs(run, stages["distill_1"], log=lambda _: None) == ["round_1/targets"]
    assert sorted(p.name for p in targets.iterdir()) == ["RELEASED.json", "manifest.json", "plan.json"]
    assert json.loads((targets / "RELEASED.json").read_text())["bytes_freed"] == 1000
    assert pipeline.is_done(run, stages["targets_1"])  # the manifest stays: targets_1 is not redone ...
    chain = list(stages.values())
    assert "targets_1" not in [s.name for s in pipeline.pending(run, chain)]
    (export / "export.json").write_text("changed")  # ... unless distill_1 must run again: then it is
    assert [s.name for s in pipeline.pending(run, chain)][:3] == ["eval_0", "targets_1", "distill_1"]
    kept = load_config(TINY)
    assert all(not s.releases for s in pipeline.build_chain(kept))  # targets.keep defaults to true


def test_mdlm_owt_dry_run_reserves_within_3x_of_compute_and_counts_the_judge(tmp_path: Path) -> None:
    """configs/mdlm-owt.yaml on 8 nodes with stand-in inputs (a GPT-2-large config.json as the judge):
    the reservation is sized per stage, and the eval memory line holds the judge, by hand: fp32 weights
    (12 L d^2 + V d without weight files) + batch 32 x 1024 x V logits x 20 B + 37 hidden states."""
    for d in ("tok", "mdlm", "owt", "gpt2-large"):
        (tmp_path / d).mkdir()
    (tmp_path / "owt" / "a.parquet").write_bytes(b"")
    (tmp_path / "gpt2-large" / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_embd": 1280, "n_layer": 36, "n_head": 20, "n_positions": 1024, "vocab_size": 50257}))
    proc = submit("--config", str(REPO / "configs" / "mdlm-owt.yaml"), "--nodes", "8", "--dry-run",
                  "--run-dir", str(tmp_path / "run"), f"data.paths=[{tmp_path}/owt/*.parquet]",
                  f"data.tokenizer={tmp_path}/tok", f"teacher.import_path={tmp_path}/mdlm",
                  f"eval.judge={tmp_path}/gpt2-large")
    assert proc.returncode == 0, proc.stderr
    reserved = float(re.search(r"GPU-hours reserved: ([\d,.]+)", proc.stdout).group(1).replace(",", ""))
    compute = float(re.search(r"GPU-hours of compute: ([\d,.]+)", proc.stdout).group(1).replace(",", ""))
    assert compute < reserved <= 3 * compute, (reserved, compute)
    assert "[control]" in proc.stdout and "[eval_control]" in proc.stdout  # the fair control runs
    n_j = 12 * 36 * 1280**2 + 50257 * 1280
    judge = 4 * n_j + 32 * 1024 * 50257 * 20 + 32 * 1024 * 1280 * 4 * 37
    line = re.search(r"eval memory per GPU: ([\d.]+) GB = sampler ([\d.]+) GB \+ judge gpt2-large, "
                     r"(\d+)M parameters in fp32, ([\d.]+) GB at batch 32", proc.stdout)
    assert line, proc.stdout
    assert int(line.group(3)) == round(n_j / 1e6) and float(line.group(4)) == round(judge / 1e9, 1)
    assert float(line.group(1)) == pytest.approx(float(line.group(2)) + judge / 1e9, abs=0.1)


def test_judge_size_counts_parameters_from_the_safetensors_headers(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from cluster.budget import JudgeSize

    tool = _tool()
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8, "num_hidden_layers": 2, "vocab_size": 11}))
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"c": torch.zeros(2, 2, 2)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    cfg = load_config(TINY, [f"eval.judge={tmp_path}"])
    assert tool.judge_size(cfg, 999) == JudgeSize(tmp_path.name, 12 + 5 + 8, 11, 8, 2)
    assert tool.judge_size(load_config(TINY, ["eval.judge=''"]), 999) is None
    snap = cached_hub_repo(tmp_path / "hub", "openai-community/gpt2-large")  # a hub name resolved at submit
    (snap / "config.json").write_text((tmp_path / "config.json").read_text())
    assert tool.judge_size(load_config(TINY, [f"eval.judge={snap}"]), 999).name == "openai-community/gpt2-large"
    assert JudgeSize("j", 25, 11, 8, 2).bytes_for(batch=3, length=7) == 4 * 25 + 3 * 7 * 11 * 20 + 3 * 7 * 8 * 4 * 3


def test_a_run_folder_refuses_another_config_naming_the_keys(tmp_path: Path) -> None:
    """Resubmitting into a run folder with other settings is refused, naming what differs; the
    folder's own config.yaml is left as it was."""
    tool = _tool()
    run = tmp_path / "run"
    cfg, run_dir, _ = tool.resolve_config(tool.parse_args(["--config", str(TINY), "--run-dir", str(run)]))
    save_config(cfg, run_dir / "config.yaml")
    before = (run_dir / "config.yaml").read_bytes()
    args = tool.parse_args(["--config", str(TINY), "--run-dir", str(run), "eval.num_samples=7", "distill.lr=1e-5"])
    with pytest.raises(ConfigError, match=r"made with another config \(differs at distill\.lr, eval\.num_samples\)"):
        tool.resolve_config(args)
    assert (run_dir / "config.yaml").read_bytes() == before
