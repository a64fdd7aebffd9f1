#!/usr/bin/env python
"""The GPU checks, prepared for the day a GPU machine is at hand: ``make gpu-check``.

    python tools/gpu_check.py [--out runs/gpu-check/gpu_check.json] [--budget-s 450] [--only NAME ...]

On a machine with a CUDA GPU, in under 8 minutes (each check has its share of ``--budget-s`` and is
stopped at it; a failed or stopped check is recorded and the others still run):

1. ``pipeline``: the tiny pipeline, shortened, end to end on ONE GPU (``tools/submit.py --local
   --nproc 1``): bf16, NCCL process group, DeepSpeed on the CUDA accelerator, flash SDPA;
2. ``pretrain``: steps of the small shape (169M, L = 1024, bf16, ZeRO-2) through the real pretrain
   job; tokens/s, peak GPU memory and MFU as the job logs them (train/mfu, gpu/peak_mem_gb);
3. ``distill``: SDTT student steps of the small shape, bf16 ZeRO-2 (``tools/bench.py train``), with
   MFU = 6 N tokens/s / device peak;
4. ``sampling``: student@16 steps against the AR sampler with a KV cache (and the cached 1024-step
   teacher), L = 1024, batch 8 (``tools/bench.py sampling``);
5. ``targets``: the targets benchmark (``tools/bench.py targets``) at the small shape.

Everything goes into ONE JSON file (``--out``), one entry per check with its numbers, seconds and,
on failure, the output's tail. Without a GPU it says so, writes ``{"gpu": null, ...}`` and exits 0,
so ``make gpu-check`` is safe to run anywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SMALL = REPO / "configs" / "small.yaml"
TINY = REPO / "configs" / "tiny.yaml"
# The small shape on synthetic data (no tokenizer or corpus needed; the model and L are small.yaml's).
SMALL_SYNTHETIC = ["data.source=synthetic", "data.tokenizer=byte", "data.synthetic.vocab_size=50257",
                   "data.seq_len=1024", "data.num_train_sequences=4096", "data.num_valid_sequences=64"]
# The shortened tiny pipeline (tests/pipeline/test_pipeline.py OVERRIDES, fewer teacher steps).
TINY_SHORT = ["train.steps=200", "train.eval_every=100", "train.ckpt_every=100", "optim.warmup_steps=20",
              "data.num_train_sequences=4096", "data.num_valid_sequences=64", "distill.rounds=2",
              "distill.start_steps=16", "distill.steps_per_round=20", "distill.warmup_steps=5",
              "targets.num_samples=256", "targets.samples_per_shard=64", "eval.steps=[4,16,64]",
              "eval.num_samples=128", "train.eval_batches=2"]
# Share of the budget per check (they sum to 1).
SHARES = {"pipeline": 0.30, "pretrain": 0.20, "distill": 0.20, "sampling": 0.15, "targets": 0.15}


def gpu_info() -> dict[str, Any] | None:
    """The first CUDA device (name, memory, peak bf16 FLOP/s if known), or None without one."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    from trainer.runtime.metrics import peak_bf16_flops

    p = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    return {"name": name, "count": torch.cuda.device_count(), "memory_gb": round(p.total_memory / 2**30, 1),
            "capability": f"{p.major}.{p.minor}", "peak_bf16_flops": peak_bf16_flops(name),
            "torch": torch.__version__, "cuda": torch.version.cuda}


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    env.pop("DS_ACCELERATOR", None)  # DeepSpeed picks the CUDA accelerator itself
    env.setdefault("CUDA_VISIBLE_DEVICES", "0")  # one GPU: the checks are per device
    return env


def _run(cmd: list[str], timeout_s: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=max(10.0, timeout_s))


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("no JSON line in the output")


def _scalars(run_dir: Path, tags: tuple[str, ...]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {t: [] for t in tags}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line)
        if rec["tag"] in out:
            out[rec["tag"]].append(rec["value"])
    return out


def _params(overrides: list[str]) -> int:
    import torch

    from trainer.config import load_config
    from trainer.model.dit import DiT, count_parameters

    with torch.device("meta"):
        return count_parameters(DiT(load_config(SMALL, overrides).model))


# --------------------------------------------------------------------------------------------------
# The checks: each returns its numbers, or raises
# --------------------------------------------------------------------------------------------------
def check_pipeline(work: Path, timeout_s: float, gpu: dict[str, Any]) -> dict[str, Any]:
    run = work / "tiny"
    proc = _run([sys.executable, str(REPO / "tools" / "submit.py"), "--config", str(TINY), "--local", "--nproc", "1",
                 "--run-dir", str(run), *TINY_SHORT], timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"tools/submit.py --local exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    report = json.loads((run / "report.json").read_text())
    state = json.loads((run / "pipeline_state.json").read_text())["stages"]
    return {"stages": {k: v.get("seconds") for k, v in state.items()}, "report_rows": report["rows"]}


def check_pretrain(work: Path, timeout_s: float, gpu: dict[str, Any]) -> dict[str, Any]:
    run, steps, batch = work / "pretrain-small", 30, 16
    overrides = [*SMALL_SYNTHETIC, f"train.steps={steps}", "train.log_every=10", "train.eval_every=1000",
                 "train.ckpt_every=1000", f"engine.global_batch_size={batch}", "engine.zero_stage=2",
                 "engine.precision=bf16"]
    prep = _run([sys.executable, "-m", "trainer.jobs.prepare", "--run-dir", str(run), "--config", str(SMALL),
                 *overrides], timeout_s / 3)
    if prep.returncode != 0:
        raise RuntimeError(f"prepare exited {prep.returncode}:\n{(prep.stdout + prep.stderr)[-3000:]}")
    proc = _run([sys.executable, "-m", "trainer.jobs.pretrain", "--run-dir", str(run), "--config", str(SMALL),
                 *overrides], timeout_s * 2 / 3)
    if proc.returncode != 0:
        raise RuntimeError(f"pretrain exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    s = _scalars(run, ("train/tokens_per_s", "train/mfu", "gpu/peak_mem_gb", "train/loss"))
    # The first logging interval holds the CUDA/NCCL start-up: the later ones are the steady state.
    steady = s["train/tokens_per_s"][1:] or s["train/tokens_per_s"]
    return {"steps": steps, "global_batch": batch, "seq_len": 1024, "tokens_per_s": steady,
            "mfu": s["train/mfu"][1:] or s["train/mfu"], "peak_mem_gb": max(s["gpu/peak_mem_gb"], default=None),
            "loss": s["train/loss"]}


def check_distill(work: Path, timeout_s: float, gpu: dict[str, Any]) -> dict[str, Any]:
    batch = 8
    overrides = [*SMALL_SYNTHETIC, f"distill.global_batch_size={batch}", "engine.precision=bf16",
                 "targets.batch_size=8"]
    proc = _run([sys.executable, str(REPO / "tools" / "bench.py"), "train", "--config", str(SMALL), "--modes",
                 "ddp,zero2", "--nproc", "1", "--samples", "64", "--steps", "10", "--warmup", "3", "--repeats", "3",
                 "--timeout", str(int(timeout_s)), "--work", str(work), *overrides], timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"bench train exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    res = _last_json(proc.stdout)
    n = _params(overrides)
    tokens_per_s = {m: res["global_batch"] * 1024 / (ms / 1e3) for m, ms in res["ms_per_step"].items()}
    peak = gpu.get("peak_bf16_flops")
    return {"ms_per_step": res["ms_per_step"], "tokens_per_s": tokens_per_s, "parameters": n,
            "mfu": {m: 6 * n * t / peak for m, t in tokens_per_s.items()} if peak else None,
            "precision": res.get("precision"), "bench": res}


def check_sampling(work: Path, timeout_s: float, gpu: dict[str, Any]) -> dict[str, Any]:
    proc = _run([sys.executable, str(REPO / "tools" / "bench.py"), "sampling", "--config", str(SMALL), "--device",
                 "cuda", "--seq-len", "1024", "--batch", "8", "--student-steps", "16", "--teacher-steps", "1024",
                 "--no-uncached-teacher", "--repeats", "3", *SMALL_SYNTHETIC], timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"bench sampling exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    res = _last_json(proc.stdout)
    return {"times_s": res.get("times_s"), "ratios": res.get("ratios"), "table": proc.stdout[-2500:]}


def check_targets(work: Path, timeout_s: float, gpu: dict[str, Any]) -> dict[str, Any]:
    proc = _run([sys.executable, str(REPO / "tools" / "bench.py"), "targets", "--config", str(SMALL), "--device",
                 "cuda", "--samples", "256", "--repeats", "3", *SMALL_SYNTHETIC], timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"bench targets exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    res = _last_json(proc.stdout)
    return {"result": res, "table": proc.stdout[-2500:]}


CHECKS: dict[str, Callable[[Path, float, dict[str, Any]], dict[str, Any]]] = {
    "pipeline": check_pipeline, "pretrain": check_pretrain, "distill": check_distill, "sampling": check_sampling,
    "targets": check_targets,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check/gpu_check.json"))
    p.add_argument("--budget-s", type=float, default=450.0, help="all checks together (default 7.5 min)")
    p.add_argument("--only", nargs="+", choices=sorted(CHECKS), default=None)
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
                              "gpu": gpu_info(), "checks": {}}
    if result["gpu"] is None:
        result["skipped"] = "no CUDA GPU visible (torch.cuda.is_available() is False): nothing measured"
        out.write_text(json.dumps(result, indent=2))
        print(f"gpu-check: no GPU on this machine: nothing measured; wrote {out}")
        return 0
    print(f"gpu-check: {result['gpu']['name']} x{result['gpu']['count']}, budget {args.budget_s:.0f} s")
    work = out.parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    names = args.only or list(CHECKS)
    total = sum(SHARES[n] for n in names)
    t_all = time.monotonic()
    for name in names:
        t0 = time.monotonic()
        share = args.budget_s * SHARES[name] / total
        try:
            entry: dict[str, Any] = {"ok": True, **CHECKS[name](work, share, result["gpu"])}
        except subprocess.TimeoutExpired:
            entry = {"ok": False, "error": f"stopped at its {share:.0f} s share of --budget-s"}
        except Exception as e:  # noqa: BLE001  (record it, run the other checks)
            entry = {"ok": False, "error": f"{type(e).__name__}: {e}"[-4000:]}
        entry["seconds"] = round(time.monotonic() - t0, 1)
        result["checks"][name] = entry
        out.write_text(json.dumps(result, indent=2, default=str))  # after each check: a kill keeps the rest
        print(f"  {name:<9} {'ok' if entry['ok'] else 'FAILED'} in {entry['seconds']:.0f} s"
              + ("" if entry["ok"] else f": {entry['error'].splitlines()[0][:200]}"))
    result["seconds"] = round(time.monotonic() - t_all, 1)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"gpu-check: wrote {out} ({result['seconds']:.0f} s)")
    return 0 if all(c["ok"] for c in result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
