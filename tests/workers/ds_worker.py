"""Worker for tests/runtime/test_engine.py, run as ``python -m torch.distributed.run --nproc_per_node N
tests/workers/ds_worker.py OUT SCENARIO``. Real DeepSpeed over gloo on CPU with a tiny model (not the
project's), so the engine's sharding, resume and conversion paths run for real.

Scenarios are grouped to pay DeepSpeed's ~6 s process start as few times as possible. Each writes
its results (losses, weights, caught errors) to ``OUT/<scenario>.pt`` from rank 0; the tests judge
those files, not the exit code (the note on the CPU setup records a rare abort at interpreter exit).

Data: sample ``i`` of the run is a function of ``i`` only, and step ``s`` uses samples
``s*G .. s*G+G-1`` split over ranks and micro-batches in order, so every world size and every
gradient-accumulation split sees the same global batch.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer.config import EngineConfig, ModelConfig, OptimConfig, RunConfig, TrainSetup  # noqa: E402
from trainer.runtime import dist  # noqa: E402

V, L, GLOBAL, MICRO, STEPS, HALF = 512, 16, 8, 2, 6, 3


class Tiny(nn.Module):
    """Embedding + MLP + head. The 512x256 tensors exceed ZeRO-3's persistence threshold (1e5
    elements) and get partitioned; the 256x256 layer (65k) stays whole: both kinds are exercised."""

    def __init__(self, d: int = 256):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.fc(self.emb(x))))


def make_model(d: int = 256) -> Tiny:
    torch.manual_seed(0)
    return Tiny(d)


def sample(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randint(0, V, (L,), generator=g)
    return x, (x * 7 + 3) % V


def micro_batches(step: int, engine) -> list[tuple[torch.Tensor, torch.Tensor]]:
    per_rank = GLOBAL // engine.world_size
    base = step * GLOBAL + engine.rank * per_rank
    out = []
    for j in range(engine.grad_accum):
        xs, ys = zip(*(sample(base + j * engine.micro_batch + k) for k in range(engine.micro_batch)))
        out.append((torch.stack(xs), torch.stack(ys)))
    return out


def loss_fn(engine, mb) -> torch.Tensor:
    x, y = mb
    return F.cross_entropy(engine(x).reshape(-1, V), y.reshape(-1))


def build(stage: int, world: int, d: int = 256, ema: float | None = 0.9):
    from trainer.runtime.engine import build_engine

    optim = OptimConfig(lr=3e-3, warmup_steps=2, schedule="cosine", grad_clip=1.0)
    eng = EngineConfig(zero_stage=stage, precision="auto", global_batch_size=GLOBAL, micro_batch_size=MICRO)
    return build_engine(make_model(d), TrainSetup(optim, GLOBAL, ema or 0.0), eng, total_steps=STEPS, world_size=world)


def train(engine, upto: int) -> list[dict]:
    stats = []
    while engine.step < upto:
        stats.append(engine.train_step(loss_fn, micro_batches(engine.step, engine)))
    return stats


def snapshot(engine) -> dict:
    """Weights (fp32 masters and forward weights) and EMA; collective."""
    from trainer.runtime.engine import consolidated_state_dict

    master = consolidated_state_dict(engine)
    module = {n: p.clone().cpu() for n, p in engine._full_params()}
    return {"master": master, "module": module, "ema": engine.ema_state_dict(), "step": engine.step}


def catch(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (the test inspects the message)
        return f"{type(e).__name__}: {e}"
    return "NO ERROR"


# --------------------------------------------------------------------------------------------------
def scenario_source(out: Path, world: int) -> dict:
    """ZeRO-2 uninterrupted run; ZeRO-2 run stopped at HALF with checkpoints; ZeRO-3 run + checkpoint."""
    res: dict = {"bcast": dist.broadcast_object({"from": dist.get_rank()}),
                 "mean_rank": dist.all_reduce_mean(float(dist.get_rank()))}
    t = time.perf_counter()
    a = build(2, world)
    res["build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    res["A_stats"] = train(a, STEPS)
    res["step_s"] = (time.perf_counter() - t) / STEPS
    res["A"] = snapshot(a)
    res["geometry"] = (a.micro_batch, a.grad_accum)

    b = build(2, world)
    root = out / "ckpt_z2"
    res["B_stats"] = []
    save_s = []
    while b.step < HALF:
        res["B_stats"] += train(b, b.step + 1)
        t = time.perf_counter()
        b.save(root, f"step_{b.step:04d}", {"step": b.step, "data_pos": b.step * GLOBAL, "pi": 3.141592653589793},
               config=RunConfig(), keep=2)
        save_s.append(time.perf_counter() - t)
    res["save_s"] = save_s
    res["B_listing"] = sorted(p.name for p in root.iterdir())
    res["B"] = snapshot(b)
    dist.barrier()
    if dist.is_main():  # an interrupted save of step 4: shards written, never renamed, latest untouched
        (root / ".tmp-step_0004").mkdir()
        (root / ".tmp-step_0004" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    dist.barrier()

    c = build(3, world)
    res["C_stats"] = train(c, HALF)
    c.save(out / "ckpt_z3", f"step_{c.step:04d}", {"step": c.step})
    res["C_half"] = snapshot(c)
    res["C_stats"] += train(c, STEPS)
    res["C"] = snapshot(c)
    return res


def scenario_resume(out: Path, world: int) -> dict:
    """Same world size, ZeRO-2: resume from `latest` and finish the run."""
    res: dict = {}
    e = build(2, world)
    t = time.perf_counter()
    res["client"] = e.load(out / "ckpt_z2", expect_model=ModelConfig())
    res["load_s"] = time.perf_counter() - t
    res["resumed_step"] = e.step
    res["stats"] = train(e, STEPS)
    res["final"] = snapshot(e)
    return res


def scenario_cross(out: Path, world: int) -> dict:
    """World size 1: ZeRO-2 and ZeRO-3 checkpoints written by 2 ranks; then every refusal case."""
    from trainer.runtime.engine import consolidated_state_dict

    res: dict = {}
    e = build(2, world)
    t = time.perf_counter()
    res["z2_client"] = e.load(out / "ckpt_z2")
    res["z2_load_s"] = time.perf_counter() - t
    res["z2_loaded"] = snapshot(e)
    res["z2_ckpt_fp32"] = consolidated_state_dict(out / "ckpt_z2" / "step_0003")
    res["z2_geometry"] = (e.micro_batch, e.grad_accum)
    res["z2_stats"] = train(e, STEPS)

    z3 = build(3, world)
    t = time.perf_counter()
    res["z3_client"] = z3.load(out / "ckpt_z3")
    res["z3_load_s"] = time.perf_counter() - t
    res["z3_loaded"] = snapshot(z3)
    res["z3_stats"] = train(z3, STEPS)
    res["z3_final"] = snapshot(z3)
    res["err_stage"] = catch(lambda: z3.load(out / "ckpt_z2"))

    # Refusals, each on its own copy of the good ZeRO-2 checkpoint (checked before DeepSpeed reads).
    src = out / "ckpt_z2"

    def copy(name: str) -> Path:
        dst = out / name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.universal"))
        return dst

    fresh = build(2, world)
    shard = "mp_rank_00_model_states.pt"
    optim = next(p.name for p in (src / "step_0003").iterdir() if p.name.endswith("optim_states.pt"))
    res["files"] = {"shard": shard, "optim": optim}

    d = copy("bad_flip")
    f = d / "step_0003" / optim
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    res["err_corrupt"] = catch(lambda: fresh.load(d))

    d = copy("bad_trunc")
    f = d / "step_0003" / shard
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    res["err_truncated"] = catch(lambda: fresh.load(d))

    d = copy("bad_meta")
    (d / "step_0003" / "engine_meta.json").write_text('{"format": 1, "step": ')
    res["err_meta"] = catch(lambda: fresh.load(d))

    d = copy("bad_latest")
    (d / "latest").write_text("step_9999\n")
    res["err_latest"] = catch(lambda: fresh.load(d))

    res["err_model_cfg"] = catch(lambda: fresh.load(src, expect_model=ModelConfig(d_model=256)))

    narrow = build(2, world, d=128)
    res["err_shape"] = catch(lambda: narrow.load(src))
    return res


SCENARIOS = {"source": scenario_source, "resume": scenario_resume, "cross": scenario_cross}


def main() -> None:
    out, name = Path(sys.argv[1]), sys.argv[2]
    info = dist.init_distributed()
    t0 = time.perf_counter()
    try:
        res = SCENARIOS[name](out, info.world_size)
        res["ok"] = True
    except Exception:  # noqa: BLE001  (reported to the test through the result file)
        res = {"ok": False, "error": traceback.format_exc()}
    res["scenario_s"] = time.perf_counter() - t0
    res["world_size"] = info.world_size
    if info.rank == 0 or not res["ok"]:
        path = out / (f"{name}.pt" if info.rank == 0 else f"{name}.rank{info.rank}.pt")
        torch.save(res, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: results are on disk; the rare gloo abort at exit (see the note)
    # must not turn a good run into a failure.
    os._exit(0)


if __name__ == "__main__":
    main()
