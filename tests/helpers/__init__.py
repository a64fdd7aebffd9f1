"""Shared test builders and constants: running the real job entry points (torchrun, 2 CPU processes
over gloo), the shortened pipeline's overrides, the distill tests' base run, small MDLM checkpoints,
a corpus in every format, TensorBoard read back. The local SLURM cluster and runs on it:
tests/helpers/slurm.py; MDLM's and SDTT's hub code: tests/helpers/mdlm_hub.py. Tests import from
this package, never from each other (tests/unit/test_layering.py)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from cluster.pipeline import free_port
from trainer.config import load_config, save_config
from trainer.data.prepared import prepare_data
from trainer.model.dit import DiT
from trainer.runtime.checkpoint import export_weights

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"

# Small enough for CI, still the tiny config's model and data.
FAST = ["data.num_train_sequences=2048", "data.num_valid_sequences=64", "train.log_every=5",
        "train.eval_batches=2", "eval.num_samples=64", "sampling.steps=16"]


class ProcessInFastTest(AssertionError):
    """A fast test (outside tests/conftest.py SLOW_FOLDERS) tried to start a process."""


def env() -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run_job(module: str, run_dir: Path, *args: str, nproc: int = 2, config: Path | None = TINY,
            check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m module --run-dir run_dir [--config] args`` under torchrun with ``nproc`` ranks."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    cmd += ["-m", module, "--run-dir", str(run_dir)]
    if config is not None:
        cmd += ["--config", str(config)]
    cmd += list(args)
    proc = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def exit_code(main, argv: list[str]) -> int:
    """What ``python -m trainer.jobs.<x> argv`` exits with, run in this process: ``main`` through the
    jobs' common entry (bad input: one line on stderr and code 2)."""
    from trainer.jobs.common import entry

    try:
        entry(lambda: main(argv))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def read_tb_scalars(tb_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars in a TensorBoard log folder: ``{tag: [(step, value), ...]}`` in write order."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={SCALARS: 0})  # 0 = keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()[SCALARS]}


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one tag from metrics.jsonl, in write order."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["tag"] == tag:
            out.append((rec["step"], rec["value"]))
    return out


# The shortened pipeline: tests/conftest.py runs `submit --config TINY --local *PIPELINE_OVERRIDES` once per
# session; tests/pipeline/test_slurm_pipeline.py compares its SLURM run with that run.
PIPELINE_OVERRIDES = [
    "train.steps=400", "train.eval_every=200", "train.ckpt_every=200", "optim.warmup_steps=50",
    "data.num_train_sequences=8192", "data.num_valid_sequences=64", "distill.rounds=2",
    "distill.start_steps=16", "distill.steps_per_round=20", "distill.warmup_steps=5",
    "targets.num_samples=256", "targets.samples_per_shard=64", "eval.steps=[4,16,64]",
    "eval.num_samples=256", "train.eval_batches=2",
    # the control stage (on in configs/tiny.yaml) is left out to keep this shared run short; its data
    # plan is tested in tests/unit/test_paired.py
    "distill.control=false"]


# 256 samples in 8 shards of 32; 24 steps of 16 = 1.5 epochs.
DISTILL_OVERRIDES = ["data.num_train_sequences=512", "data.num_valid_sequences=64", "targets.num_samples=256",
             "targets.samples_per_shard=32", "targets.batch_size=32", "targets.k=8", "sampling.steps=16",
             "distill.global_batch_size=16", "distill.steps_per_round=24", "distill.warmup_steps=4", "distill.lr=1e-3",
             "distill.log_consumed=true", "distill.loader_workers=0", "train.ckpt_every=8", "train.log_every=4",
             "train.eval_every=1000"]
N, G = 256, 16


def random_teacher_run(run: Path, overrides: list[str], std: float) -> Path:
    """A run folder with config.yaml (TINY + overrides), prepared data and a teacher export whose
    every weight is N(0, std^2) (DiT's zero-initialised gates and head would make a uniform teacher);
    its EMA weights are 0.9 x the raw ones, so the two are told apart."""
    cfg = load_config(TINY, overrides)
    save_config(cfg, run / "config.yaml")
    prepare_data(cfg.data, run / "data")
    g = torch.Generator().manual_seed(0)
    model = DiT(cfg.model)
    raw = {k: std * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    export_weights(run / "teacher" / "export", raw, {k: 0.9 * v for k, v in raw.items()}, cfg, step=0)
    return run


def base_run(tmp_path_factory) -> Path:
    """A run folder with config.yaml, prepared data, a random teacher and round 1's targets, built
    once per test session (shared by test_reader.py and test_distill.py). Copy it before writing to it."""
    root = tmp_path_factory.getbasetemp() / "distill-base"
    run = root / "run"
    if (root / "ready").exists():
        return run
    shutil.rmtree(root, ignore_errors=True)
    # 0.2 gives a teacher neither flat nor one-hot, so distillation has something to learn.
    random_teacher_run(run, DISTILL_OVERRIDES, std=0.2)
    targets_in_process(run, 1)
    (root / "ready").touch()
    return run


def targets_in_process(run: Path, round_idx: int) -> None:
    """The real targets job, in this process (world size 1; ~1 s instead of a subprocess)."""
    from trainer.jobs import targets  # the job under test: helpers for tests/jobs

    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert targets.main(["--run-dir", str(run), "--round", str(round_idx)]) == 0
    finally:
        torch.set_num_threads(threads)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(k, None)
        os.environ.update(saved)




# --------------------------------------------------------------------------------------------------
# A small checkpoint in MDLM's published layout (tests/unit/test_mdlm_import.py, tests/jobs/test_import_teacher.py)
# --------------------------------------------------------------------------------------------------
V1, D, LAYERS, HEADS, COND, LENGTH = 41, 32, 2, 4, 16, 24  # V1 = vocabulary incl. MASK


def mdlm_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with MDLM's names and shapes (no prefix), adaLN included, all non-zero."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, mean=0.0):
        return (mean + 0.2 * torch.randn(shape, generator=g)).contiguous()

    hd = D // HEADS
    sd = {
        "vocab_embed.embedding": rnd(V1, D),
        "sigma_map.mlp.0.weight": rnd(COND, 256), "sigma_map.mlp.0.bias": rnd(COND),
        "sigma_map.mlp.2.weight": rnd(COND, COND), "sigma_map.mlp.2.bias": rnd(COND),
        "rotary_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd),
        "output_layer.norm_final.weight": rnd(D, mean=1.0),
        "output_layer.adaLN_modulation.weight": rnd(2 * D, COND),
        "output_layer.adaLN_modulation.bias": rnd(2 * D),
        "output_layer.linear.weight": rnd(V1, D), "output_layer.linear.bias": rnd(V1),
    }
    for i in range(LAYERS):
        p = f"blocks.{i}."
        sd |= {
            p + "norm1.weight": rnd(D, mean=1.0), p + "norm2.weight": rnd(D, mean=1.0),
            p + "attn_qkv.weight": rnd(3 * D, D), p + "attn_out.weight": rnd(D, D),
            p + "mlp.0.weight": rnd(4 * D, D), p + "mlp.0.bias": rnd(4 * D),
            p + "mlp.2.weight": rnd(D, 4 * D), p + "mlp.2.bias": rnd(D),
            p + "adaLN_modulation.weight": rnd(6 * D, COND), p + "adaLN_modulation.bias": rnd(6 * D),
        }
    return sd


def write_checkpoint(directory, sd, prefix="backbone.", config=None):
    directory.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v for k, v in sd.items()}, str(directory / "model.safetensors"))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def hf_config(time_conditioning=False):
    return {"vocab_size": V1, "model_length": LENGTH, "hidden_dim": D, "cond_dim": COND, "n_blocks": LAYERS,
            "n_heads": HEADS, "dropout": 0.1, "time_conditioning": time_conditioning}


def sdtt_hydra_config(start_from_hf=True, model_type="ddit-orig", time_conditioning=False):
    """The parts of SDTT's Hydra config that MultiRoundSDTT.push_to_hub saves as config.json
    (configs/config.yaml, model/dit-orig-small.yaml, parameterization/multi-round-sdtt.yaml), at the
    test's small shape."""
    return {"mode": "train", "time_conditioning": time_conditioning, "T": 0,
            "model": {"name": "small", "type": model_type, "hidden_size": D, "cond_dim": COND, "length": LENGTH,
                      "n_blocks": LAYERS, "n_heads": HEADS, "scale_by_sigma": True, "dropout": 0.1,
                      "tie_word_embeddings": False},
            "parameterization": {"name": "multi-round-sdtt", "checkpoint_path": "kuleshov-group/mdlm-owt",
                                 "start_from_hf": start_from_hf, "distill_mode": "kl-bwd", "num_distill_steps": 2},
            "tokenizer": {"name": "gpt2"}, "training": {"ema": 0.9999, "sampling_eps": 1e-5}}


def random_weights(model: DiT, seed: int = 0, scale: float = 0.2) -> DiT:
    """``model`` with seeded normal weights of std ``scale`` (a fixed, untrained net whose outputs are
    not near uniform), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    model.load_state_dict({k: scale * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()})
    return model.eval()


def byte_ar_judge(seed: int = 0):
    """A small random causal DiT over bytes as a text judge (trainer.evaluation.judges.ARJudge)."""
    from trainer.config import ModelConfig
    from trainer.data.tokenizers import ByteTokenizer
    from trainer.evaluation.judges import ARJudge

    cfg = ModelConfig(vocab_size=257, n_layers=2, d_model=32, n_heads=4, cond_dim=16, max_seq_len=64)
    return ARJudge(random_weights(DiT(cfg, causal=True), seed), ByteTokenizer())


# --------------------------------------------------------------------------------------------------
# A small corpus in every local format
# --------------------------------------------------------------------------------------------------
CORPUS_DOCS = [f"document {i}: " + "lorem ipsum " * (i % 5) + "é" * (i % 3) for i in range(50)]


def write_corpus_formats(root):
    """CORPUS_DOCS in every local format the text source reads (tests/unit/test_text_data.py,
    tests/processes/test_packing_workers.py)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    (root / "c.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(CORPUS_DOCS)))
    table = pa.table({"id": list(range(len(CORPUS_DOCS))), "text": CORPUS_DOCS})
    pq.write_table(table, root / "c.parquet", row_group_size=7)
    with pa.OSFile(str(root / "file.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table, max_chunksize=9)
    ds = datasets.Dataset.from_dict({"text": CORPUS_DOCS, "id": list(range(len(CORPUS_DOCS)))})
    ds.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(3))}).save_to_disk(str(root / "dict"))
    (root / "one.txt").write_text(CORPUS_DOCS[0])
    return root
