"""What a run will cost, before anything is queued (``tools/submit.py --dry-run``).

Per stage and in total:

* **GPU-hours reserved**: nodes x GPUs per node x time limit, i.e. what the allocation holds if the
  job runs to its limit, for one attempt (each requeue, up to ``slurm.max_requeues``, may hold it
  again). It is an upper bound of the bill, not an estimate of the work.
* **tokens** processed and the **FLOP** they cost: 6 N per trained token (forward + backward),
  2 N per token through a frozen model (targets, eval), N = parameters; attention FLOP not counted.
  ``gpu_hours_needed`` turns FLOP into GPU-hours at an assumed MFU of a given peak (default: 40 % of
  an H100/H200 SXM's 989 TFLOP/s dense bf16), to set against what is reserved.
* **memory per GPU** for training stages: the model states of the chosen ZeRO stage over the
  stage's world size W (bf16 mixed precision on GPU: 2 N bf16 weights + 2 N bf16 gradients + 12 N
  fp32 master/Adam m/Adam v, ZeRO-1 shards the 12 N, ZeRO-2 also the gradients, ZeRO-3 everything;
  fp32 on CPU: 4 N + 4 N + 8 N), plus the replicated fp32 EMA (4 N, trainer/runtime/ema.py), plus a
  peak activation estimate for one micro-batch b of length L: 34 b L d bytes per layer in bf16
  (Korthikanti et al. 2022, flash attention: no L^2 term; doubled in fp32) plus the logits,
  b L (V+1) x (bf16 copy + fp32 copy + fp32 log-softmax) = 10 bytes per logit in bf16. Frozen-model
  stages hold 2 N (bf16) weights and the logits of one batch. An evaluation also holds its judge
  (``eval.judge``, a causal LM run in fp32 as trainer/evaluation/text.py runs it): 4 N_j bytes of
  weights, and for one batch b of L tokens its fp32 logits, their fp64 copy and fp64 log-softmax
  (b L V_j x 20 bytes) plus every layer's fp32 hidden state (b L d_j x 4 bytes x (layers + 1), it
  asks for them all). Estimates: the allocator, NCCL buffers and fragmentation come on top.
* an evaluation samples every (step count, temperature) of its plan: ``eval.steps`` at temperature
  1, plus ``eval.temperatures`` at each round's count for the teacher and the control and at its own
  count for a student (``eval_plan`` of trainer/evaluation/sweep.py, passed in); the judge reads
  every sample once per row.
* **target bytes** per round and for all rounds (offline mode), from the codec's bytes per masked
  position (half the positions are masked on average: t ~ U(0, 1)) plus the int32 noised sequence
  and the tar/npy headers. With ``targets.keep: false`` a round's shards are removed once its distill
  stage is recorded done, so the disk holds one round at a time.

This module is arithmetic only. What it needs of the trainer (parameter count, bytes of a target
sample, the evaluations' sampling plan) is passed in by ``tools/submit.py`` (cluster/ imports nothing
of trainer/ but the config).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cluster.pipeline import Stage
from cluster.resources import ClusterSpec, StageResources, stage_kind, stage_resources
from trainer.config import RunConfig

# Peak dense bf16 tensor FLOP/s per device (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H100 SXM": 989e12, "H200": 989e12, "H100 PCIe": 756e12, "A100": 312e12}
ASSUMED_MFU = 0.40


@dataclass(frozen=True)
class TargetSize:
    """Bytes of one target sample in a shard: expected (half the positions masked) and worst case."""

    expected: float
    bound: float


@dataclass(frozen=True)
class JudgeSize:
    """What the budget needs of the evaluation's judge (read from its config.json and weights by
    tools/submit.py): parameters, vocabulary, width, layers."""

    name: str
    params: int
    vocab_size: int
    d_model: int
    n_layers: int

    def bytes_for(self, batch: int, length: int) -> float:
        """Peak bytes on the GPU: fp32 weights + one batch's logits (fp32, fp64 copy, fp64
        log-softmax) + every layer's fp32 hidden state (module doc)."""
        logits = batch * length * self.vocab_size * (4 + 8 + 8)
        hidden = batch * length * self.d_model * 4 * (self.n_layers + 1)
        return float(4 * self.params + logits + hidden)


@dataclass(frozen=True)
class StageBudget:
    stage: str
    res: StageResources
    gpu_hours: float  # reserved, one attempt
    tokens: float  # tokens through the model (trained or inferred)
    flop: float
    state_bytes: float  # per GPU: weights + gradients + optimizer + EMA (training) or weights (inference)
    activation_bytes: float  # per GPU: peak activations + logits, estimate
    target_bytes: float  # written by this stage (targets_R)
    judge_bytes: float = 0.0  # per GPU, eval stages: the judge's weights + activations (in the two above)

    @property
    def memory_bytes(self) -> float:
        return self.state_bytes + self.activation_bytes


@dataclass(frozen=True)
class Budget:
    stages: list[StageBudget]
    params: int
    target_bytes_per_round: float
    target_bytes_all_rounds: float
    target_bytes_peak: float  # on disk at once (targets.keep decides)

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)

    @property
    def flop(self) -> float:
        return sum(s.flop for s in self.stages)

    @property
    def tokens(self) -> float:
        return sum(s.tokens for s in self.stages)


def model_state_bytes(n: float, zero_stage: int, world: int, bf16: bool, ema: bool = True) -> float:
    """Per-GPU bytes of weights + gradients + optimizer (+ replicated fp32 EMA) under ZeRO."""
    w, g, o = (2 * n, 2 * n, 12 * n) if bf16 else (4 * n, 4 * n, 8 * n)
    if zero_stage >= 1:
        o /= world
    if zero_stage >= 2:
        g /= world
    if zero_stage >= 3:
        w /= world
    return w + g + o + (4 * n if ema else 0)


def activation_bytes(cfg: RunConfig, batch: int, bf16: bool, train: bool) -> float:
    """Peak activations of one (micro-)batch: stored per layer when training, one layer's when not,
    plus the logits (see the module doc)."""
    m, L = cfg.model, cfg.data.seq_len
    per_elem = 2 if bf16 else 4
    per_layer = 17 * per_elem * batch * L * m.d_model
    layers = per_layer * (m.n_layers if train else 1)
    logits = batch * L * (m.vocab_size + 1) * (per_elem + 8)
    return float(layers + logits)


def _micro(global_batch: int, micro: int, world: int) -> int:
    per_rank = max(1, global_batch // max(1, world))
    return micro or per_rank


# (config, round, control) -> the (step count, temperature) rows that evaluation samples:
# trainer/evaluation/sweep.py eval_plan, what trainer/jobs/evaluate.py draws.
EvalPlan = Callable[[RunConfig, int, bool], set[tuple[int, float]]]


def evaluated_model(st: Stage) -> tuple[int, bool]:
    """(round, control) of an evaluation stage, read from its arguments (pipeline.build_chain):
    ``--round R`` and ``--control``."""
    return int(st.args[st.args.index("--round") + 1]), "--control" in st.args


def stage_budget(st: Stage, cfg: RunConfig, res: StageResources, n: int, size: TargetSize,
                 eval_plan: EvalPlan, judge: JudgeSize | None = None) -> StageBudget:
    kind, L, W = stage_kind(st.name), cfg.data.seq_len, res.world_size
    judge_bytes = 0.0
    bf16 = res.gpus_per_node > 0 and cfg.engine.precision != "fp32" or cfg.engine.precision == "bf16"
    zero = cfg.engine.zero_stage
    tokens = flop = state = act = targets = 0.0
    if kind in ("teacher", "ar", "control", "distill") and st.distributed:
        if kind in ("teacher", "ar"):  # the AR baseline trains with the teacher's setup and steps
            steps, batch = cfg.train.steps, cfg.engine.global_batch_size
        elif kind == "control":
            steps, batch = cfg.distill.rounds * cfg.distill.steps_per_round, cfg.distill.global_batch_size
        else:
            steps, batch = cfg.distill.steps_per_round, cfg.distill.global_batch_size
        tokens = float(steps) * batch * L
        flop = 6.0 * n * tokens
        state = model_state_bytes(n, zero, W, bf16)
        act = activation_bytes(cfg, _micro(batch, cfg.engine.micro_batch_size, W), bf16, train=True)
        if kind == "distill" and cfg.distill.mode == "online":  # the teacher in the loop
            flop += 2.0 * n * tokens * cfg.targets.teacher_steps
            state += 2 * n if bf16 else 4 * n
    elif kind == "targets":
        tokens = float(cfg.targets.num_samples) * L * cfg.targets.teacher_steps
        flop = 2.0 * n * tokens
        state = (2 if bf16 else 4) * n
        act = activation_bytes(cfg, cfg.targets.batch_size, bf16, train=False)
        targets = cfg.targets.num_samples * size.expected
    elif kind == "eval":
        plan = eval_plan(cfg, *evaluated_model(st))
        tokens = float(cfg.eval.num_samples) * L * sum(s for s, _ in plan)  # every step a full forward (no cache)
        flop = 2.0 * n * tokens
        state = (2 if bf16 else 4) * n
        act = activation_bytes(cfg, cfg.eval.batch_size, bf16, train=False)
        if judge is not None:  # every row's samples through the judge once
            judged = float(cfg.eval.num_samples) * L * len(plan)
            tokens += judged
            flop += 2.0 * judge.params * judged
            state += 4 * judge.params
            judge_bytes = judge.bytes_for(cfg.eval.batch_size, L)
            act += judge_bytes - 4 * judge.params
    return StageBudget(st.name, res, res.gpu_hours, tokens, flop, state, act, targets, judge_bytes)


def budget(stages: list[Stage], cfg: RunConfig, spec: ClusterSpec, n_params: int, size: TargetSize,
           run_name: str = "sdtt", judge: JudgeSize | None = None, *, eval_plan: EvalPlan) -> Budget:
    rows = [stage_budget(st, cfg, stage_resources(st, cfg, spec, run_name), n_params, size, eval_plan, judge)
            for st in stages]
    per_round = cfg.targets.num_samples * size.expected if cfg.distill.mode == "offline" else 0.0
    rounds = cfg.distill.rounds
    return Budget(rows, n_params, per_round, per_round * rounds,
                  per_round * (rounds if cfg.targets.keep else 1))


def gpu_hours_needed(flop: float, peak: float = PEAK_BF16_FLOPS["H100 SXM"], mfu: float = ASSUMED_MFU) -> float:
    return flop / (peak * mfu) / 3600


def _b(x: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.0f} B"


def _n(x: float) -> str:
    for unit, scale in (("e18", 1e18), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale and unit != "e18":
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def render(b: Budget, cfg: RunConfig, judge: JudgeSize | None = None) -> list[str]:
    """The budget table and totals, as printed by ``--dry-run``."""
    w = max([13, *(len(s.stage) for s in b.stages)])  # eval_control_7 is longer than the header
    out = ["", "budget (one attempt of every stage; GPU-h reserved = nodes x GPUs x time limit):",
           f"  {'stage':<{w}} {'nodes x tasks':>13} {'GPUs':>5} {'time':>11} {'GPU-h':>9} {'tokens':>9} "
           f"{'FLOP':>9} {'mem/GPU (states + act.)':>26} {'targets':>9}"]
    for s in b.stages:
        r = s.res
        mem = f"{_b(s.memory_bytes)} ({_b(s.state_bytes)} + {_b(s.activation_bytes)})" if s.memory_bytes else "-"
        out.append(f"  {s.stage:<{w}} {f'{r.nodes} x {r.tasks_per_node}':>13} {r.nodes * r.gpus_per_node:>5} "
                   f"{r.time_min // 60:>7d}h{r.time_min % 60:02d}m {s.gpu_hours:>9,.1f} "
                   f"{_n(s.tokens) if s.tokens else '-':>9} {f'{s.flop:.2e}' if s.flop else '-':>9} {mem:>26} "
                   f"{_b(s.target_bytes) if s.target_bytes else '-':>9}")
    need = gpu_hours_needed(b.flop)
    out += [f"  {'total':<{w}} {'':>13} {'':>5} {'':>11} {b.gpu_hours:>9,.1f} {_n(b.tokens):>9} {b.flop:>9.2e}",
            "",
            f"  GPU-hours reserved: {b.gpu_hours:,.1f} per attempt (requeues: up to slurm.max_requeues="
            f"{cfg.slurm.max_requeues} more per stage)",
            f"  GPU-hours of compute: {need:,.1f} at {ASSUMED_MFU:.0%} MFU of 989 TFLOP/s (H100/H200 SXM bf16 dense), "
            f"6 N per trained token, 2 N per inferred token, N = {b.params:,}",
            f"  memory per GPU, largest stage: {_b(max((s.memory_bytes for s in b.stages), default=0))} "
            f"(ZeRO-{cfg.engine.zero_stage}; estimate, allocator and NCCL buffers not included)"]
    evals = [s for s in b.stages if stage_kind(s.stage) == "eval"]
    if evals:
        e = max(evals, key=lambda s: s.memory_bytes)
        if judge is not None:
            what = (f"judge {judge.name}, {judge.params / 1e6:,.0f}M parameters in fp32, "
                    f"{_b(e.judge_bytes)} at batch {cfg.eval.batch_size}")
        elif cfg.eval.judge:
            what = f"judge {cfg.eval.judge} NOT counted: its size is unknown (no config.json there)"
        else:
            what = "no judge (eval.judge is empty)"
        out.append(f"  eval memory per GPU: {_b(e.memory_bytes)} = sampler {_b(e.memory_bytes - e.judge_bytes)} "
                   f"+ {what}")
    if b.target_bytes_per_round:
        keep = "targets.keep=true: every round kept" if cfg.targets.keep else \
            "targets.keep=false: a round's shards removed once its distill is done"
        rounds = f"{cfg.distill.rounds} round" + ("s" if cfg.distill.rounds > 1 else "")
        out.append(f"  target storage: {_b(b.target_bytes_per_round)} per round, {_b(b.target_bytes_all_rounds)} "
                   f"for {rounds}; on disk at once: {_b(b.target_bytes_peak)} ({keep})")
    return out


__all__ = ["Budget", "EvalPlan", "JudgeSize", "StageBudget", "TargetSize", "evaluated_model", "budget", "render",
           "model_state_bytes", "activation_bytes", "gpu_hours_needed", "PEAK_BF16_FLOPS"]
