"""Typed configuration: defaults <- YAML <- CLI ``key=value`` overrides, validated once.

Every component gets its own dataclass and receives only that sub-config. OmegaConf's structured
mode gives us unknown-key and type errors for free; we re-raise them with the offending key and the
file (or "command line") they came from, then run the cross-field checks OmegaConf cannot express.

The resolved config is written into every run folder and checkpoint (``save_config``) and reloads to
an equal object (``load_config(saved)``).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.errors import BadInput
from trainer.fileio import atomic_write_text


class ConfigError(BadInput, ValueError):
    """A configuration problem, with the key and the source it came from in the message."""


# --------------------------------------------------------------------------------------------------
# Names: the choices of a key, declared once
# --------------------------------------------------------------------------------------------------
# StrEnums typed into the dataclasses below: OmegaConf refuses any other value and names the key. A
# member equals its string ("topk" == Codec.topk, json writes "topk") and the resolved config.yaml
# holds the member's name, which is spelled like its value, so the file reads as with plain strings.
# The modules that implement the names (trainer/method/codecs/, divergences.py, runtime/lr.py,
# targets/reader.py) read them from here, and tests/unit/test_names.py checks that they match.
class Codec(StrEnum):
    """targets.codec: how a teacher distribution is stored per masked position (trainer/method/codecs/)."""

    topk = "topk"
    topk_is = "topk_is"
    sampled = "sampled"
    dense = "dense"


class Divergence(StrEnum):
    """distill.divergence: what the student is trained against (trainer/method/divergences.py)."""

    rkl = "rkl"
    fkl = "fkl"
    mse = "mse"
    tvd = "tvd"


# Which divergences each codec's targets can serve (offline distillation). The sampled code is an
# unbiased estimate of the teacher distribution with zeros off the sampled ids: forward KL
# (cross-entropy against the estimate) stays unbiased in its gradient; reverse KL and MSE would need
# the teacher's log-prob wherever the student has mass (infinite at the zeros), and TV of the
# estimate is biased (|.| is not linear). topk_is: its tail draws estimate the within-tail KL of
# either direction; TV and MSE have no such estimate.
PAIRS: dict[Codec, tuple[Divergence, ...]] = {
    Codec.topk: tuple(Divergence),
    Codec.topk_is: (Divergence.rkl, Divergence.fkl),
    Codec.sampled: (Divergence.fkl,),
    Codec.dense: tuple(Divergence),
}


# The divergences whose optimum over R target draws has a closed form, hence an ideal student
# (eval.ideal_rollouts; trainer/method/ideal.py): the normalised geometric mean (rkl) or the mean (fkl).
IDEAL_DIVERGENCES: tuple[Divergence, ...] = (Divergence.rkl, Divergence.fkl)


class Schedule(StrEnum):
    """optim.schedule: the lr after warm-up (trainer/runtime/lr.py)."""

    constant = "constant"
    cosine = "cosine"


class VerifyPolicy(StrEnum):
    """targets.verify: the reader's answer to a shard with a bad checksum (trainer/targets/reader.py)."""

    fail = "fail"
    skip = "skip"


class DataSource(StrEnum):
    """data.source: where the rows come from (trainer/data/)."""

    synthetic = "synthetic"
    text = "text"
    hf = "hf"


# teacher.source: pretrain (trainer.jobs.pretrain), import (a published MDLM checkpoint,
# trainer.jobs.import_teacher) or oracle (the exact denoiser of a synthetic source,
# trainer.jobs.oracle_teacher). Built by name because "import" is a Python keyword.
TeacherSource = StrEnum("TeacherSource", [("pretrain", "pretrain"), ("import", "import"), ("oracle", "oracle")])


class Precision(StrEnum):
    """engine.precision: auto (bf16 on GPU, fp32 on CPU), fp32 or bf16 (trainer/runtime/engine.py)."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class DistillMode(StrEnum):
    """distill.mode: offline (target shards) or online (the teacher in the loop, dense)."""

    offline = "offline"
    online = "online"


class EvalWeights(StrEnum):
    """eval.weights: which exported weights are evaluated."""

    ema = "ema"
    raw = "raw"


class GenPPL(StrEnum):
    """eval.gen_ppl: which judge tokens gen-PPL scores (trainer/evaluation/protocols.py)."""

    mdlm = "mdlm"
    sdtt = "sdtt"
    first_doc = "first_doc"


class MauveProtocol(StrEnum):
    """eval.mauve_protocol: MAUVE's prompts and references (trainer/evaluation/mauve_protocol.py)."""

    heldout = "heldout"
    sdtt = "sdtt"


class UnmaskOrder(StrEnum):
    """sampling.order: which masked positions a step reveals (trainer/method/diffusion.py)."""

    random = "random"
    confidence = "confidence"


class TimeGrid(StrEnum):
    """sampling.grid: the sampler's time steps (trainer/method/diffusion.py)."""

    linear = "linear"
    cosine = "cosine"


def choice_names(choices: Iterable[StrEnum]) -> tuple[str, ...]:
    """The plain strings of a choice list (an enum, or some of its members), in order."""
    return tuple(c.value for c in choices)


# --------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """DiT backbone shape. ``vocab_size`` counts real tokens; the MASK id is ``vocab_size``."""

    vocab_size: int = 64
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    cond_dim: int = 128
    mlp_ratio: int = 4
    max_seq_len: int = 128
    dropout: float = 0.0
    # MDLM/SDTT feed sigma = 0 to the network: the denoiser is time-agnostic, which is also what
    # makes prediction caching valid during sampling.
    time_conditioning: bool = False
    rope_base: float = 10000.0


@dataclass
class SyntheticConfig:
    """A seeded sparse first-order Markov chain: sequences have an exactly computable likelihood."""

    vocab_size: int = 64
    branching: int = 6  # successors per state
    concentration: float = 0.6  # Dirichlet concentration of the transition weights
    # Probability of a uniform jump at each step, mixed into every row: every sequence then has a
    # finite likelihood, so the exact NLL of a few-step sampler's output (which pairs neighbours that
    # are never adjacent in the data) stays a number instead of +inf. 0 gives the purely sparse chain.
    leak: float = 1e-3
    seed: int = 1234


@dataclass
class DataConfig:
    source: DataSource = DataSource.synthetic
    seq_len: int = 64
    tokenizer: str = "byte"  # "byte" or a local directory holding a Hugging Face tokenizer
    paths: list[str] = field(default_factory=list)  # globs of .txt / .jsonl files (source=text)
    text_field: str = "text"  # jsonl / hf field that holds the text
    hf_name: str = ""
    hf_config: str = ""
    hf_split: str = "train"
    hf_revision: str = ""  # a hub branch/tag/commit, e.g. refs/convert/parquet (the hub's parquet conversion)
    num_train_sequences: int = 20000  # synthetic: how many to draw; text: cap (0 = all)
    # valid.npy's rows: with valid_docs, a seeded sample of the held-out documents' rows; without,
    # random packed rows of the whole corpus (which share documents with training rows).
    num_valid_sequences: int = 512
    # Document-level holdout (text and hf sources; trainer/data/prepared.py): the last test_docs
    # documents form test.npy, the valid_docs before them valid.npy, training sees only the rest.
    # MDLM on OpenWebText: valid_docs=100000 (train[-100000:]); SDTT's new loader: 75000 + 25000.
    valid_docs: int = 0  # 0 = no holdout: validation rows are random packed rows (see above)
    test_docs: int = 0
    expect_docs: int = 0  # refuse a corpus with fewer documents (e.g. a partial download); 0 = no check
    seed: int = 0  # split / ordering seed
    cache_dir: str = ""  # where prepared token data lives; "" = <run>/data
    # Every document is followed by EOS. wrap: MDLM's rows, [BOS] + L-2 tokens of that stream + [EOS]
    # (mdlm-owt's training data); off: the stream cut into rows of L anywhere (trainer/data/packing.py).
    wrap: bool = False
    workers: int = 0  # tokeniser processes when preparing text; 0 = auto (CPUs available, one per 32 MB of files)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class DiffusionConfig:
    """Log-linear MDLM schedule: move_chance(t) = (1 - eps) t."""

    noise_eps: float = 1e-3
    train_eps: float = 1e-3  # t ~ U(train_eps, 1) during training
    sampling_eps: float = 1e-5  # end of the sampling time grid
    antithetic: bool = True


@dataclass
class SamplingConfig:
    steps: int = 128
    batch_size: int = 64
    cache: bool = True  # reuse the denoiser output when no token changed (time-agnostic models)
    seed: int = 0
    # Training-free samplers, for every model's samples (evaluation, sample reports; not the teacher
    # rollouts that make SDTT targets, which stay MDLM's sampler): trainer/method/diffusion.py. The
    # defaults are MDLM's.
    top_p: float = 1.0  # nucleus: keep the smallest set of likeliest tokens with mass >= top_p (1 = off)
    min_p: float = 0.0  # keep tokens with probability >= min_p x the likeliest's (0 = off)
    order: UnmaskOrder = UnmaskOrder.random  # MDLM's | confidence: unmask the most confident, the schedule's count
    grid: TimeGrid = TimeGrid.linear  # MDLM's | cosine: MaskGIT's cosine schedule of the masked fraction


PLAIN_SAMPLER = "plain"  # the name of the evaluation rows drawn with ``sampling.*`` (each model's own sampler)


@dataclass
class SamplerConfig:
    """A named training-free sampler the evaluation sweeps beside the plain one (``eval.samplers``)."""

    name: str = ""
    top_p: float = 1.0
    min_p: float = 0.0
    order: UnmaskOrder = UnmaskOrder.random
    grid: TimeGrid = TimeGrid.linear
    # Its own temperature sweep ([] = eval.temperatures): a truncation lowers the entropy, so reaching
    # the data's entropy by interpolation may need temperatures above 1. Include 1.0 for the read at
    # temperature 1.
    temperatures: list[float] = field(default_factory=list)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 2500
    schedule: Schedule = Schedule.constant  # after warmup
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    grad_clip: float = 1.0


@dataclass
class EngineConfig:
    """DeepSpeed ZeRO and batch geometry. micro x accumulation x world = global batch."""

    zero_stage: int = 2
    precision: Precision = Precision.auto  # auto: bf16 on GPU, fp32 on CPU
    global_batch_size: int = 512
    micro_batch_size: int = 0  # per rank; 0 = global / world (no accumulation)
    # How long any rank waits in one collective (all-reduce, barrier, broadcast) before the job ends
    # with an error: a rank that hangs (stopped, dead node, deadlock) then ends the job instead of
    # holding the allocation until its time limit (torch's default: 30 min). It must exceed rank 0's
    # longest solo phase (an export, the samples of an evaluation); 10 min is Megatron-LM's default.
    collective_timeout_s: float = 600.0


@dataclass
class TrainConfig:
    """Loop settings shared by the pretraining and distillation jobs."""

    steps: int = 1000000
    log_every: int = 10
    eval_every: int = 1000
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    ema: float = 0.9999
    eval_batches: int = 8
    seed: int = 0
    # Stop (with a checkpoint) after this many optimizer steps in this invocation; 0 = run to the end.
    # For time-sliced allocations, and how tests interrupt a run at an exact step.
    stop_after: int = 0


@dataclass
class TeacherConfig:
    # pretrain | import | oracle: the exact (Bayes-optimal) denoiser of the synthetic Markov source,
    # no training (trainer/model/oracle.py, trainer.jobs.oracle_teacher): the best any teacher can be.
    source: TeacherSource = TeacherSource.pretrain
    import_path: str = ""  # local directory in the published MDLM layout (source=import)
    # source=oracle: the exact teacher has no network weights, so round 1's student and the control
    # start from this DiT export (e.g. a trained teacher's <run>/teacher/export; its targets.use_ema
    # weights), or, when "", from a seeded random init (train.seed).
    init_from: str = ""
    # Also train the same-size autoregressive model (trainer.jobs.pretrain --ar, <run>/ar): the text
    # judge of eval.judge=ar and the AR baseline of the sampling benchmark. A pipeline stage, off by default.
    train_ar: bool = False


@dataclass
class TargetsConfig:
    """Offline SDTT targets written by the sharded teacher-inference job."""

    num_samples: int = 4096
    teacher_steps: int = 2  # m ancestral teacher steps per student step
    # topk_is (top-K + K importance-sampled tail ids) is the default: at equal bytes it beat topk at
    # the data's entropy (docs/benchmarks.md); topk's bucket is blind to how the student spreads its tail.
    codec: Codec = Codec.topk_is  # topk_is | topk (top-K + one tail bucket) | sampled | dense
    k: int = 8  # topk_is at K = 8 stores 8K + 4 = 68 bytes per position at GPT-2's vocabulary (topk's at K = 16)
    samples_per_shard: int = 256
    shard_max_bytes: int = 256 * 1024 * 1024
    batch_size: int = 32
    use_ema: bool = True  # load the teacher's EMA weights (else the raw ones)
    verify: VerifyPolicy = VerifyPolicy.fail  # reader policy on a bad checksum
    # Keep every round's target shards (true), or remove round R's shards (keeping its manifest)
    # once distill_R is recorded done: nothing reads them after that, and at the small config they
    # are ~55 GB per round. The pipeline removes them only after the done record is written.
    keep: bool = True


@dataclass
class DistillConfig:
    """SDTT rounds. The paper's recipe lives in the optimiser/engine defaults of the distill stage."""

    rounds: int = 7
    start_steps: int = 1024  # sampling steps of the round-1 teacher; halves every round
    steps_per_round: int = 10000
    divergence: Divergence = Divergence.rkl  # rkl | fkl | mse | tvd
    mode: DistillMode = DistillMode.offline  # offline (target shards) | online (teacher in the loop, dense)
    resample: bool = False  # infinite resampled stream instead of exact epochs
    lr: float = 6e-5
    warmup_steps: int = 500
    global_batch_size: int = 128
    ema: float = 0.9999
    # Which weights of student r become teacher r + 1: its EMA, or (the paper's default) its raw
    # weights. Round 1's teacher is the pretrained/imported one: targets.use_ema
    # (trainer.distill.rounds.teacher_weights).
    ema_as_teacher: bool = False
    # Also train and evaluate the control: the round-1 weights trained on with the MDLM loss for
    # the students' whole budget. The honest baseline when the teacher is not converged.
    control: bool = False
    reset_optimizer: bool = False
    weight_decay: float = 0.0  # the paper's AdamW has none (optim.betas/eps/grad_clip are shared)
    # The data order is cut into this many streams (each a contiguous part of every epoch's shard
    # order, read by one DataLoader worker); it fixes the order, so resume with the same value.
    # 0 = world size x max(1, loader_workers). Must divide distill.global_batch_size.
    streams: int = 0
    loader_workers: int = 1  # DataLoader processes per rank reading the shards; 0 = in the training process
    # Write <run>/round_R/student/consumed/rank-NNNN.jsonl: the sample indices of every step (tests, audits).
    log_consumed: bool = False


@dataclass
class EvalConfig:
    steps: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256, 512, 1024])
    num_samples: int = 256
    batch_size: int = 64
    weights: EvalWeights = EvalWeights.ema  # which exported weights are evaluated
    judge: str = ""  # "" (none), "ar" (the project's AR model at ar_path), a local HF model dir or a cached hub name
    ar_path: str = ""  # the AR model's export dir; "" = <run>/ar/export (trainer.jobs.pretrain --ar)
    seed: int = 1
    # Sampling temperatures swept at the compared step counts (each round's count, for the teacher
    # and the control; its own count for a student), to read every model's quality at the data's own
    # entropy (trainer/evaluation/paired.py). 1.0 is always evaluated at every count in eval.steps.
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    # Training-free samplers of the teacher (round 0) swept like the plain one, at every round's step
    # count and every temperature: each student is compared with the best of them at equal steps
    # and at the data's entropy (trainer/evaluation/compare.py ``compare_samplers``). [] = none.
    samplers: list[SamplerConfig] = field(default_factory=list)
    # True source samples drawn for the reference row (entropy, NLL floor, bigram-KL floor); 0 = none.
    reference_samples: int = 4096
    # Text sources (trainer/evaluation/text.py): MAUVE of this many prefix-conditioned samples
    # against held-out rows (0 = off), the clamped prefix length (0 = seq_len / 4), and how many
    # held-out rows the likelihood bound is measured on.
    mauve_samples: int = 256
    prefix_tokens: int = 0
    elbo_rows: int = 512
    # Which judge tokens gen-PPL scores (trainer/evaluation/protocols.py): mdlm (MDLM's and Duo's
    # mask: every non-EOS token and the first EOS, positions 1..T-1 of the whole retokenised sample),
    # sdtt (every position 1..T-1; the sample's own ids when the judge shares its vocabulary) or
    # first_doc (up to the first EOS, this project's earlier rule).
    gen_ppl: GenPPL = GenPPL.mdlm
    # MAUVE's protocol: "heldout" (the cheap default above: continuations of held-out rows after
    # prefix_tokens, one per row, compared without the prefix) or "sdtt" (SDTT's: prompts from the
    # local jsonl mauve_prompts (a 'text' field, e.g. GPT-2's webtext.test.jsonl), documents of at
    # least mauve_min_doc_tokens tokens, the first mauve_samples of them, mauve_prompt_tokens
    # clamped + mauve_gen_tokens sampled, mauve_continuations per prompt, prefix included in the
    # compared text, MAUVE with seeds 1..mauve_seeds and scaling mauve_scaling, reported as mean and
    # std over seeds; features from the local causal LM at mauve_features, "" = the judge).
    mauve_protocol: MauveProtocol = MauveProtocol.heldout
    mauve_prompts: str = ""
    mauve_prompt_tokens: int = 50
    mauve_gen_tokens: int = 50
    mauve_min_doc_tokens: int = 1024
    mauve_continuations: int = 5
    mauve_seeds: int = 5
    mauve_scaling: float = 5.0
    mauve_features: str = ""
    # LAMBADA zero-shot as SDTT computes it (trainer/evaluation/lambada.py): a local jsonl with a
    # 'text' field (openai's lambada_test.jsonl); "" = off. lambada_t_samples: noise levels per
    # example of its likelihood bound (SDTT: 32).
    lambada: str = ""
    lambada_t_samples: int = 32
    # The ideal SDTT student of each round (trainer/method/ideal.py), evaluated beside its teacher:
    # N-step sampling from the optimum of distill.divergence over the teacher's m-step targets, estimated
    # from this many teacher rollouts per step (0 = off); ideal_repeats independent rollout sets give
    # its Monte Carlo error (the row is their per-sample mean).
    ideal_rollouts: int = 0
    ideal_repeats: int = 2


@dataclass
class StageSlurmConfig:
    """What one kind of stage asks SLURM for, where it differs from the run-wide ``slurm.*`` values.
    Kinds: prepare, teacher, ar, targets, distill, eval, control, report (every round's ``distill_R`` is
    ``distill``; ``eval_control`` is ``eval``). 0 / -1 / "" = the default of the kind."""

    time: str = ""  # sbatch --time grammar (MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]); "" = --time / slurm.time_min
    nodes: int = 0  # 0: every node of --nodes for the distributed stages, 1 for the others
    gpus_per_node: int = -1  # -1: the kind's default (all GPUs of a node; 1 for eval/import; 0 for prepare/report)
    cpus_per_task: int = 0  # 0 = slurm.cpus_per_task
    mem_gb_per_task: int = 0  # 0 = slurm.mem_gb_per_task
    partition: str = ""  # "" = --partition / slurm.partition (e.g. a CPU partition for prepare/report)
    constraint: str = ""  # "" = --constraint / slurm.constraint; "none" = no constraint (e.g. on a CPU partition)


def _default_stage_slurm() -> dict[str, StageSlurmConfig]:
    # prepare and report compute nothing on a GPU; report is seconds of work.
    return {"prepare": StageSlurmConfig(gpus_per_node=0),
            "report": StageSlurmConfig(gpus_per_node=0, time="30")}


STAGE_KINDS = ("prepare", "teacher", "ar", "targets", "distill", "eval", "control", "report")


@dataclass
class SlurmConfig:
    """Where and how every job runs on SLURM: the one place for launch options. tools/submit.py's
    launch flags (--partition, --time, --sbatch, ...) are shorthands that override these keys for one
    submission; only the allocation's shape (--nodes, --tasks-per-node) is not a key here."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    time_min: int = 240
    gpus_per_node: int = 8
    cpus_per_task: int = 8
    mem_gb_per_task: int = 64
    signal_lead_s: int = 120  # USR2 this long before the time limit
    max_requeues: int = 10
    # Site hooks. ``setup``: shell lines run before each task starts (module load, conda activate,
    # a container wrapper's environment), in order, before the job cds into its code snapshot.
    setup: list[str] = field(default_factory=list)
    constraint: str = ""  # sbatch --constraint (e.g. "h100")
    exclude: str = ""  # sbatch --exclude (a node list)
    reservation: str = ""  # sbatch --reservation
    # Further sbatch options, long name without the dashes -> value ("" for a bare flag), e.g.
    # {exclusive: "", mem: "0", comment: "sdtt"}. They reach every stage's job.
    additional: dict[str, str] = field(default_factory=dict)
    # Environment set in every job: fixed values (e.g. NCCL_DEBUG: WARN), and the names (globs
    # allowed, e.g. "NCCL_*") whose values are copied from the submitting shell at submit time.
    env: dict[str, str] = field(default_factory=dict)
    env_from_shell: list[str] = field(default_factory=list)
    # Extra srun options of every job step, e.g. a container (pyxis/enroot):
    # ["--container-image=/images/sdtt.sqsh", "--container-mounts=/data:/data"]. slurm.setup lines run
    # on the batch host before srun, outside the container; these reach the tasks themselves.
    srun_args: list[str] = field(default_factory=list)
    # Per kind of stage (eval) or per stage (eval_0, which then wins over its kind): time limits,
    # node/GPU counts, CPU-only stages (see StageSlurmConfig).
    stages: dict[str, StageSlurmConfig] = field(default_factory=_default_stage_slurm)


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def _merge(base, layer, source: str):
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as e:  # unknown key, wrong type, ...
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{source}: bad config key '{key}': {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Build the run config from typed defaults, an optional YAML file and ``key=value`` overrides."""
    cfg = OmegaConf.structured(RunConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layer = OmegaConf.create(_quote_times(path.read_text()))
        except Exception as e:  # YAML syntax errors
            raise ConfigError(f"{path}: cannot parse YAML: {_first_line(e)}") from None
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...), "
                              f"not a {type(layer).__name__}")
        cfg = _merge(cfg, layer, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' is not of the form key=value")
        try:
            layer = OmegaConf.from_dotlist([_quote_times(item)])
        except OmegaConfBaseException as e:
            raise ConfigError(f"command line: bad override '{item}': {_first_line(e)}") from None
        cfg = _merge(cfg, layer, f"command line ('{item}')")
    run: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    source = str(path) if path else "defaults"
    if overrides:
        source += " + command line"
    validate(run, source=source)
    return run


# YAML 1.1 reads 30:00 and 1:00:00 as base-60 integers (1800, 3600): a time limit written unquoted,
# `time: 30:00`, would reach the config as 1800 minutes. Quote such values of `time` keys (the only
# ones are slurm.stages.<kind>.time) before YAML sees them, so they keep sbatch's meaning.
_SEXAGESIMAL_TIME = re.compile(r"(\btime\s*[:=]\s*)(\d+(?:-\d+)?(?::\d+)+)(?=\s*(?:[,}\]#]|$))", re.M)


def _quote_times(text: str) -> str:
    return _SEXAGESIMAL_TIME.sub(r'\1"\2"', text)


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, to_yaml(cfg))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_diff(a: RunConfig, b: RunConfig) -> list[str]:
    """The dotted keys at which two configs differ, sorted (a key only one of them has counts)."""
    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


# --------------------------------------------------------------------------------------------------
# Validation: everything OmegaConf's types cannot say
# --------------------------------------------------------------------------------------------------
def _check(ok: bool, source: str, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: bad config key '{key}': {why}")


def _choice(value: str, allowed: tuple[str, ...], source: str, key: str) -> None:
    _check(value in allowed, source, key, f"'{value}' is not one of {', '.join(allowed)}")


def validate(cfg: RunConfig, source: str = "config") -> None:
    m, d = cfg.model, cfg.data
    for key in ("vocab_size", "n_layers", "d_model", "n_heads", "cond_dim", "mlp_ratio", "max_seq_len"):
        _check(getattr(m, key) > 0, source, f"model.{key}", "must be positive")
    _check(m.d_model % m.n_heads == 0, source, "model.n_heads",
           f"{m.n_heads} heads do not divide model.d_model={m.d_model}")
    _check((m.d_model // m.n_heads) % 2 == 0, source, "model.n_heads",
           "the head dimension must be even for rotary embeddings")
    _check(0.0 <= m.dropout < 1.0, source, "model.dropout", "must be in [0, 1)")

    _choice(d.source, choice_names(DataSource), source, "data.source")
    _check(d.seq_len > 1, source, "data.seq_len", "must be at least 2")
    _check(d.seq_len <= m.max_seq_len, source, "data.seq_len",
           f"{d.seq_len} is longer than the model's context model.max_seq_len={m.max_seq_len}")
    _check(d.num_valid_sequences > 0, source, "data.num_valid_sequences", "must be positive")
    # (The synthetic source ignores these, as it ignores data.paths: small.yaml's OWT keys stay harmless
    # under data.source=synthetic, which draws its validation rows independently of the training rows.)
    for key in ("valid_docs", "test_docs", "expect_docs"):
        _check(getattr(d, key) >= 0, source, f"data.{key}", "must be >= 0 (0 = off)")
    _check(d.test_docs == 0 or d.valid_docs > 0, source, "data.test_docs",
           "needs data.valid_docs > 0 (a test split beside random validation rows would overlap training)")
    if d.source == "synthetic":
        s = d.synthetic
        _check(s.vocab_size >= 2, source, "data.synthetic.vocab_size", "must be at least 2")
        _check(s.vocab_size == m.vocab_size, source, "model.vocab_size",
               f"{m.vocab_size} must equal data.synthetic.vocab_size={s.vocab_size}")
        _check(1 <= s.branching <= s.vocab_size, source, "data.synthetic.branching",
               f"must be in [1, data.synthetic.vocab_size={s.vocab_size}]")
        _check(s.concentration > 0, source, "data.synthetic.concentration", "must be positive")
        _check(0 <= s.leak < 1, source, "data.synthetic.leak", "must be in [0, 1)")
        _check(d.num_train_sequences > 0, source, "data.num_train_sequences", "must be positive")
    _check(d.workers >= 0, source, "data.workers", "must be >= 0 (0 = all available CPUs)")
    _check(not d.wrap or d.seq_len > 2, source, "data.wrap", "wrapped rows need data.seq_len > 2")
    if d.source == "text":
        _check(len(d.paths) > 0, source, "data.paths", "data.source=text needs at least one glob")
    if d.source == "hf":
        _check(bool(d.hf_name), source, "data.hf_name", "data.source=hf needs a dataset name")

    df = cfg.diffusion
    _check(0 < df.noise_eps < 1, source, "diffusion.noise_eps", "must be in (0, 1)")
    _check(0 < df.train_eps < 1, source, "diffusion.train_eps", "must be in (0, 1)")
    _check(0 < df.sampling_eps < 1, source, "diffusion.sampling_eps", "must be in (0, 1)")
    _check(cfg.sampling.steps >= 1, source, "sampling.steps", "must be at least 1")
    _check(cfg.sampling.batch_size >= 1, source, "sampling.batch_size", "must be at least 1")
    _check_sampler(cfg.sampling, source, "sampling")

    o = cfg.optim
    _check(o.lr > 0, source, "optim.lr", "must be positive")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), source, "optim.betas",
           "must be two numbers in [0, 1)")
    _check(o.warmup_steps >= 0, source, "optim.warmup_steps", "must be >= 0")
    _choice(o.schedule, choice_names(Schedule), source, "optim.schedule")
    _check(o.grad_clip >= 0, source, "optim.grad_clip", "must be >= 0 (0 disables clipping)")

    e = cfg.engine
    _check(e.zero_stage in (0, 1, 2, 3), source, "engine.zero_stage", f"{e.zero_stage} is not 0, 1, 2 or 3")
    _choice(e.precision, choice_names(Precision), source, "engine.precision")
    _check(e.global_batch_size >= 1, source, "engine.global_batch_size", "must be positive")
    _check(e.micro_batch_size >= 0, source, "engine.micro_batch_size", "must be >= 0")
    _check(e.collective_timeout_s > 0, source, "engine.collective_timeout_s", "must be positive (seconds)")

    t = cfg.train
    for key in ("steps", "log_every", "eval_every", "ckpt_every", "keep_checkpoints", "eval_batches"):
        _check(getattr(t, key) >= 1, source, f"train.{key}", "must be at least 1")
    _check(0 <= t.ema < 1, source, "train.ema", "must be in [0, 1)")
    _check(t.stop_after >= 0, source, "train.stop_after", "must be >= 0 (0 = no limit)")

    _choice(cfg.teacher.source, choice_names(TeacherSource), source, "teacher.source")
    if cfg.teacher.source == "oracle":
        _check(d.source == "synthetic", source, "teacher.source",
               f"oracle is the exact denoiser of the synthetic Markov source; data.source={d.source}")
        _check(d.synthetic.leak > 0, source, "data.synthetic.leak",
               "teacher.source=oracle needs leak > 0 (a zero-probability context leaves the posterior undefined)")
    if cfg.teacher.source == "import":
        _check(bool(cfg.teacher.import_path), source, "teacher.import_path",
               "teacher.source=import needs a local directory")

    g = cfg.targets
    _check(g.num_samples >= 1, source, "targets.num_samples", "must be positive")
    _check(g.teacher_steps >= 1, source, "targets.teacher_steps", "must be at least 1")
    _choice(g.codec, choice_names(Codec), source, "targets.codec")
    _check(1 <= g.k <= m.vocab_size, source, "targets.k", f"must be in [1, model.vocab_size={m.vocab_size}]")
    _check(g.samples_per_shard >= 1, source, "targets.samples_per_shard", "must be positive")
    _check(g.shard_max_bytes >= 1024, source, "targets.shard_max_bytes", "must be at least 1024")
    _check(g.batch_size >= 1, source, "targets.batch_size", "must be positive")
    _choice(g.verify, choice_names(VerifyPolicy), source, "targets.verify")

    ds = cfg.distill
    _check(ds.rounds >= 1, source, "distill.rounds", "must be at least 1")
    _check(round_steps(cfg, ds.rounds) >= 1, source, "distill.start_steps",
           f"{ds.start_steps} cannot halve distill.rounds={ds.rounds} times to at least one step")
    _check(ds.steps_per_round >= 1, source, "distill.steps_per_round", "must be positive")
    _choice(ds.divergence, choice_names(Divergence), source, "distill.divergence")
    _choice(ds.mode, choice_names(DistillMode), source, "distill.mode")
    # Offline, the student reads coded targets: the codec must serve the divergence (PAIRS, with the reasons).
    served = PAIRS[Codec(g.codec)]  # (g.codec is a member, or a plain string in a config built in code)
    _check(ds.mode != "offline" or ds.divergence in served, source, "distill.divergence",
           f"'{ds.divergence}' cannot be computed from targets.codec={g.codec} targets; use "
           f"{' or '.join(served)}, or targets.codec=topk")
    _check(ds.lr > 0, source, "distill.lr", "must be positive")
    _check(ds.global_batch_size >= 1, source, "distill.global_batch_size", "must be positive")
    _check(0 <= ds.ema < 1, source, "distill.ema", "must be in [0, 1)")
    _check(ds.warmup_steps >= 0, source, "distill.warmup_steps", "must be >= 0")
    _check(ds.weight_decay >= 0, source, "distill.weight_decay", "must be >= 0")
    _check(ds.streams >= 0, source, "distill.streams", "must be >= 0 (0 = world size x loader workers)")
    _check(ds.streams == 0 or ds.global_batch_size % ds.streams == 0, source, "distill.streams",
           f"{ds.streams} streams do not divide distill.global_batch_size={ds.global_batch_size}")
    _check(ds.loader_workers >= 0, source, "distill.loader_workers", "must be >= 0")

    ev = cfg.eval
    _check(len(ev.steps) > 0 and all(s >= 1 for s in ev.steps), source, "eval.steps",
           "must be a non-empty list of positive step counts")
    _check(ev.num_samples >= 2, source, "eval.num_samples", "must be at least 2 (for a standard error)")
    _check(ev.batch_size >= 1, source, "eval.batch_size", "must be positive")
    _choice(ev.weights, choice_names(EvalWeights), source, "eval.weights")
    _check(len(ev.temperatures) > 0 and all(float(x) > 0 for x in ev.temperatures), source, "eval.temperatures",
           "must be a non-empty list of positive sampling temperatures")
    names = [sp.name for sp in ev.samplers]
    for i, sp in enumerate(ev.samplers):
        _check(bool(sp.name) and sp.name.replace("_", "").replace("-", "").replace(".", "").isalnum(), source,
               f"eval.samplers[{i}].name", "must be a non-empty name of letters, digits, '-', '_' or '.'")
        _check(sp.name not in names[:i], source, f"eval.samplers[{i}].name", f"'{sp.name}' is used twice")
        _check(sp.name != PLAIN_SAMPLER, source, f"eval.samplers[{i}].name",
               f"'{PLAIN_SAMPLER}' names the sampling.* sampler")
        _check_sampler(sp, source, f"eval.samplers[{i}]")
        _check(all(float(x) > 0 for x in sp.temperatures), source, f"eval.samplers[{i}].temperatures",
               "must be positive sampling temperatures ([] = eval.temperatures)")
    _check(ev.reference_samples >= 0, source, "eval.reference_samples", "must be >= 0 (0 = no reference row)")
    _check(ev.mauve_samples >= 0, source, "eval.mauve_samples", "must be >= 0 (0 = no MAUVE)")
    _check(0 <= ev.prefix_tokens < d.seq_len, source, "eval.prefix_tokens",
           f"must be in [0, data.seq_len={d.seq_len}) (0 = a quarter of the row)")
    _check(ev.elbo_rows >= 1, source, "eval.elbo_rows", "must be positive")
    _choice(ev.gen_ppl, choice_names(GenPPL), source, "eval.gen_ppl")
    _choice(ev.mauve_protocol, choice_names(MauveProtocol), source, "eval.mauve_protocol")
    if ev.mauve_protocol == "sdtt" and ev.mauve_samples > 0:
        _check(bool(ev.mauve_prompts), source, "eval.mauve_prompts",
               "eval.mauve_protocol=sdtt needs a local jsonl of prompts (a 'text' field per line, e.g. "
               "GPT-2's webtext.test.jsonl)")
        for key in ("mauve_prompt_tokens", "mauve_gen_tokens", "mauve_continuations", "mauve_seeds"):
            _check(getattr(ev, key) >= 1, source, f"eval.{key}", "must be positive")
        _check(ev.mauve_prompt_tokens + ev.mauve_gen_tokens <= m.max_seq_len, source, "eval.mauve_gen_tokens",
               f"prompt + generated tokens ({ev.mauve_prompt_tokens} + {ev.mauve_gen_tokens}) exceed the "
               f"model's context model.max_seq_len={m.max_seq_len}")
        _check(ev.mauve_min_doc_tokens >= ev.mauve_prompt_tokens + ev.mauve_gen_tokens, source,
               "eval.mauve_min_doc_tokens", "must be at least mauve_prompt_tokens + mauve_gen_tokens")
        _check(ev.mauve_scaling > 0, source, "eval.mauve_scaling", "must be positive")
    _check(ev.lambada_t_samples >= 1, source, "eval.lambada_t_samples", "must be positive")
    _check(ev.ideal_rollouts >= 0, source, "eval.ideal_rollouts", "must be >= 0 (0 = no ideal-student row)")
    _check(ev.ideal_repeats >= 2, source, "eval.ideal_repeats",
           "must be at least 2 (independent rollout sets give the ideal row's Monte Carlo error)")
    _check(ev.ideal_rollouts == 0 or d.source == "synthetic", source, "eval.ideal_rollouts",
           "the ideal-student row is scored by the synthetic source's exact likelihood; text runs do not support it")
    _check(ev.ideal_rollouts == 0 or cfg.distill.divergence in IDEAL_DIVERGENCES, source, "eval.ideal_rollouts",
           f"the ideal student is defined for distill.divergence {' or '.join(IDEAL_DIVERGENCES)}, not "
           f"'{cfg.distill.divergence}'")
    _check(ev.judge != "ar" or bool(ev.ar_path) or cfg.teacher.train_ar, source, "eval.judge",
           "eval.judge=ar needs the AR model: set teacher.train_ar=true (the pipeline trains it into "
           "<run>/ar) or eval.ar_path to an AR export")

    sl = cfg.slurm
    _check(sl.time_min >= 1, source, "slurm.time_min", "must be positive")
    _check(sl.gpus_per_node >= 0, source, "slurm.gpus_per_node", "must be >= 0")
    _check(sl.cpus_per_task >= 1, source, "slurm.cpus_per_task", "must be positive")
    _check(sl.mem_gb_per_task >= 0, source, "slurm.mem_gb_per_task", "must be >= 0 (0 = --mem=0, the whole node)")
    _check(0 < sl.signal_lead_s < sl.time_min * 60, source, "slurm.signal_lead_s",
           "must be positive and shorter than the time limit")
    _check(sl.max_requeues >= 0, source, "slurm.max_requeues", "must be >= 0")
    for i, arg in enumerate(sl.srun_args):
        _check(arg.startswith("-") and "\n" not in arg, source, f"slurm.srun_args[{i}]",
               f"{arg!r} is not an srun option (one option per entry, e.g. --container-image=IMAGE)")
    for i, line in enumerate(sl.setup):
        _check("\n" not in line, source, f"slurm.setup[{i}]", "one shell line per entry (no newline)")
    for opt in sl.additional:
        _check(bool(re.fullmatch(r"[a-z][a-z0-9-]*", opt)), source, f"slurm.additional.{opt}",
               "must be an sbatch long option name without the dashes, e.g. exclusive, mem, comment")
    for name in (*sl.env, *sl.env_from_shell):
        _check(bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_*?]*", name)), source, f"slurm.env.{name}",
               "is not an environment variable name (globs * ? allowed in env_from_shell)")
    for kind, st in sl.stages.items():
        key = f"slurm.stages.{kind}"
        _check(kind.split("_", 1)[0] in STAGE_KINDS, source, key,
               f"'{kind}' is neither a kind of stage ({', '.join(STAGE_KINDS)}) nor a stage of one (e.g. eval_0)")
        if st.time:
            minutes = parse_slurm_time(st.time, f"bad config key '{key}.time'", source)
            _check(minutes * 60 > sl.signal_lead_s, source, f"{key}.time",
                   f"{st.time} leaves no time before the USR2 signal lead slurm.signal_lead_s={sl.signal_lead_s}")
        _check(st.nodes >= 0, source, f"{key}.nodes", "must be >= 0 (0 = the kind's default)")
        _check(st.gpus_per_node >= -1, source, f"{key}.gpus_per_node", "must be >= -1 (-1 = the kind's default)")
        _check(st.cpus_per_task >= 0, source, f"{key}.cpus_per_task", "must be >= 0 (0 = slurm.cpus_per_task)")
        _check(st.mem_gb_per_task >= 0, source, f"{key}.mem_gb_per_task", "must be >= 0 (0 = slurm.mem_gb_per_task)")


_TIME = re.compile(r"(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                   r"|(?P<h>\d+):(?P<hm>\d+):(?P<hs>\d+)|(?P<m>\d+)(?::(?P<s>\d+))?)")


def parse_slurm_time(text: str, what: str = "bad flag '--time'", source: str = "") -> int:
    """sbatch's ``--time`` grammar, to whole minutes (seconds round up): ``M``, ``M:S``, ``H:M:S``,
    ``D-H``, ``D-H:M``, ``D-H:M:S``. So ``30:00`` is 30 minutes, as sbatch reads it. ``what`` names
    the flag or key in the error."""
    m = _TIME.fullmatch(str(text).strip())
    prefix = f"{source}: " if source else ""
    if not m:
        raise ConfigError(f"{prefix}{what}: '{text}' is not a SLURM time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
                          "D-HH:MM:SS)")
    g = {k: int(v) for k, v in m.groupdict().items() if v is not None}
    seconds = (g.get("d", 0) * 86400 + (g.get("dh", 0) + g.get("h", 0)) * 3600
               + (g.get("dm", 0) + g.get("hm", 0) + g.get("m", 0)) * 60 + g.get("ds", 0) + g.get("hs", 0)
               + g.get("s", 0))
    if seconds <= 0:
        raise ConfigError(f"{prefix}{what}: '{text}' is not a positive duration")
    return -(-seconds // 60)


def format_slurm_time(minutes: int) -> str:
    """Minutes as sbatch's ``D-HH:MM:SS`` (``HH:MM:SS`` under a day)."""
    d, rest = divmod(int(minutes), 1440)
    return (f"{d}-" if d else "") + f"{rest // 60:02d}:{rest % 60:02d}:00"


# --------------------------------------------------------------------------------------------------
# Paths: resolved once, at submit time, against the submitting directory
# --------------------------------------------------------------------------------------------------
# Every config value that names a file or folder. A job runs in its code snapshot (SLURM) or in the
# caller's directory (--local), so a relative path would mean different things in different places:
# tools/submit.py makes them absolute against the directory it was started from, and the run's
# config.yaml stores them absolute. How each key is read:
#   path     always a path; must exist (unless "" or one of the key's special words)
#   output   a path that the run creates (data.cache_dir): made absolute, never required to exist
#   glob     data.paths: globs made absolute; each must match at least one file
#   name     path or Hugging Face hub name (eval.judge): a value that exists, or that looks like a
#            path (absolute, or starting with ./ ../ ~), is a path and must exist; anything else
#            (e.g. gpt2-large, org/model) is a hub name, looked up in the local HF cache now (no
#            network) and replaced by its snapshot folder; a name not cached is refused with the
#            `hf download` command that fetches it (a compute node may have no network at all).
PATH_KEYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "data.tokenizer": ("path", ("byte",)),
    "data.paths": ("glob", ()),
    "data.cache_dir": ("output", ("",)),
    "teacher.import_path": ("path", ("",)),
    "teacher.init_from": ("path", ("",)),
    "eval.judge": ("name", ("", "ar")),
    "eval.ar_path": ("path", ("",)),
    "eval.mauve_prompts": ("path", ("",)),
    "eval.mauve_features": ("path", ("",)),
    "eval.lambada": ("path", ("",)),
}


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value in (".", "..")


def _abs(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p)).rstrip("/") or "/"


def _used(cfg: RunConfig, key: str) -> bool:
    """Whether the run reads this path at all (a missing path it never reads is no error)."""
    if key == "data.paths":
        return cfg.data.source == "text"
    if key == "teacher.import_path":
        return cfg.teacher.source == "import"
    if key == "teacher.init_from":
        return cfg.teacher.source == "oracle"
    if key == "eval.ar_path":
        return cfg.eval.judge == "ar"
    if key == "eval.mauve_prompts":
        return cfg.eval.mauve_protocol == "sdtt" and cfg.eval.mauve_samples > 0
    if key == "eval.mauve_features":
        return cfg.eval.mauve_samples > 0
    if key == "data.tokenizer":
        return cfg.data.source != "synthetic"
    return True


# What a judge needs of a hub repository: its weights, config and tokenizer, not every framework's.
HUB_JUDGE_FILES = ("*.safetensors", "*.json", "*.txt")


def hub_download_command(name: str) -> str:
    includes = " ".join(f"--include '{p}'" for p in HUB_JUDGE_FILES)
    return f"hf download {name} {includes}"


def hub_snapshot(name: str) -> tuple[str, str]:
    """(the local snapshot folder of hub repository ``name``, "") from the Hugging Face cache
    (HF_HOME / HF_HUB_CACHE), without network; or ("", why not, with the command that fetches it)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        return "", f"'{name}' is a Hugging Face hub name, but huggingface_hub is not installed (pip install -e '.[hf]')"
    fetch = f"fetch it with: {hub_download_command(name)}"
    try:
        folder = Path(snapshot_download(name, local_files_only=True))
    except HFValidationError:
        return "", f"'{name}' is neither an existing path nor a valid hub repository name"
    except (LocalEntryNotFoundError, OSError):
        return "", f"'{name}' is not in the local Hugging Face cache; {fetch}"
    if not (folder / "config.json").is_file():
        return "", f"'{name}' is cached at {folder} without its config.json (a partial download); {fetch}"
    return str(folder), ""


def resolve_paths(cfg: RunConfig, base: str | Path) -> tuple[RunConfig, list[str]]:
    """A copy of ``cfg`` with every path of :data:`PATH_KEYS` absolute against ``base``, and the
    problems found (``"bad config key 'data.tokenizer': tokenizers/gpt2 -> /abs/tokenizers/gpt2
    does not exist"``), empty when every path the run reads exists."""
    import copy
    import glob as globlib

    base = Path(base).resolve()
    out = copy.deepcopy(cfg)
    problems: list[str] = []
    for key, (kind, special) in PATH_KEYS.items():
        section, name = key.split(".")
        holder = getattr(out, section)
        value = getattr(holder, name)
        if kind == "glob":
            resolved = [_abs(v, base) for v in value]
            setattr(holder, name, resolved)
            if _used(out, key):
                for raw, pattern in zip(value, resolved):
                    if not globlib.glob(pattern):
                        problems.append(f"bad config key '{key}': '{raw}' matches no file (as {pattern})")
            continue
        if value in special:
            continue
        if kind == "name":
            candidate = _abs(value, base)
            if Path(candidate).exists() or _looks_like_path(value):
                setattr(holder, name, candidate)
                if not Path(candidate).exists() and _used(out, key):
                    problems.append(f"bad config key '{key}': '{value}' does not exist (as {candidate})")
            elif _used(out, key):  # a hub name: its cached snapshot, or the command that fetches it
                snapshot, problem = hub_snapshot(value)
                if snapshot:
                    setattr(holder, name, snapshot)
                else:
                    problems.append(f"bad config key '{key}': {problem}")
            continue
        resolved_value = _abs(value, base)
        setattr(holder, name, resolved_value)
        if kind == "path" and _used(out, key) and not Path(resolved_value).exists():
            problems.append(f"bad config key '{key}': '{value}' does not exist (as {resolved_value})")
    return out, problems


def _check_sampler(sp, source: str, key: str) -> None:
    """The training-free sampler options of ``sampling`` or an ``eval.samplers`` entry."""
    _check(0 < sp.top_p <= 1, source, f"{key}.top_p", "must be in (0, 1] (1 = no nucleus cut)")
    _check(0 <= sp.min_p < 1, source, f"{key}.min_p", "must be in [0, 1) (0 = no min-p cut)")
    _choice(sp.order, choice_names(UnmaskOrder), source, f"{key}.order")
    _choice(sp.grid, choice_names(TimeGrid), source, f"{key}.grid")


@dataclass(frozen=True)
class TrainSetup:
    """What one training stage optimises with: the optimiser (lr, warm-up and weight decay resolved
    for the stage), the global batch and the EMA decay (0 = none). ``key`` is the config section that
    holds the stage's batch size, so geometry errors name the key the user must change."""

    optim: OptimConfig
    global_batch_size: int
    ema: float = 0.0
    key: str = "engine"
    # The lr decay restarts its end every this many steps (0 = one decay over the run): distillation's
    # rounds, so that the control, one run over every round's steps, gets the students' rates.
    schedule_segment: int = 0


def pretrain_setup(cfg: RunConfig) -> TrainSetup:
    """The teacher's pretraining: ``optim.*``, ``engine.global_batch_size``, ``train.ema``."""
    return TrainSetup(cfg.optim, cfg.engine.global_batch_size, cfg.train.ema, "engine")


def distill_setup(cfg: RunConfig) -> TrainSetup:
    """Every distillation round, and the control run (it must match the students' budget, round by
    round: the decay restarts every ``distill.steps_per_round``, as each round's engine does): the
    paper's recipe in ``distill.lr``, ``distill.warmup_steps``, ``distill.weight_decay``,
    ``distill.global_batch_size`` and ``distill.ema``; betas, eps, schedule and grad_clip from ``optim``."""
    d = cfg.distill
    optim = dataclasses.replace(cfg.optim, lr=d.lr, warmup_steps=d.warmup_steps, weight_decay=d.weight_decay)
    return TrainSetup(optim, d.global_batch_size, d.ema, "distill", schedule_segment=d.steps_per_round)


def round_steps(cfg: RunConfig, round_idx: int) -> int:
    """Sampling steps of the student after round ``round_idx`` (1-based; 0: the teacher's
    ``distill.start_steps``): start / 2**round. The one home of this rule."""
    return cfg.distill.start_steps // (2 ** round_idx)


def batch_geometry(global_batch: int, micro_batch: int, world_size: int, key: str = "engine") -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) for a global batch over ``world_size`` ranks."""
    if global_batch % world_size:
        raise ConfigError(f"bad config key '{key}.global_batch_size': {global_batch} is not divisible by "
                          f"the world size {world_size}")
    per_rank = global_batch // world_size
    micro = micro_batch or per_rank
    if per_rank % micro:
        raise ConfigError(f"bad config key '{key}.micro_batch_size': {micro} does not divide the per-rank "
                          f"batch {per_rank} (global {global_batch} / world {world_size})")
    return micro, per_rank // micro
