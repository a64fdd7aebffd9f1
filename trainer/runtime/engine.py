"""DeepSpeed ZeRO, behind a small interface. The ONLY module that imports deepspeed.

    info = dist.init_distributed()
    engine = build_engine(model, pretrain_setup(cfg), cfg.engine, cfg.train.steps, info.world_size)
    state = engine.load(ckpt_root, expect_model=cfg.model) or {"data_pos": 0}

    def loss_fn(engine, batch):              # this rank's mean loss on one micro-batch
        x = batch.to(engine.device)
        return loss_of(engine(x), x)         # engine(...) is the DeepSpeed forward

    while engine.step < cfg.train.steps:
        stats = engine.train_step(loss_fn, [next(batches) for _ in range(engine.grad_accum)])
        if engine.step % cfg.train.ckpt_every == 0:
            engine.save(ckpt_root, f"step_{engine.step:08d}", {"data_pos": ...},
                        config=cfg, keep=cfg.train.keep_checkpoints)
    raw, ema = engine.consolidated_state_dict(), engine.ema_state_dict()   # every rank
    if info.is_main:
        checkpoint.export_weights(out_dir, raw, ema, cfg, engine.step)

Checkpoint layout (one folder per tag under ``ckpt_root``)::

    latest                  tag of the newest complete checkpoint; written last, atomically
    <tag>/                  DeepSpeed's own files (*model_states.pt, *optim_states.pt)
          client_state.json the caller's state, rank 0's (JSON: no pickle of ours)
          rng.json          every rank's RNG states
          ema.safetensors   fp32 EMA (if any)
          config.yaml       the resolved RunConfig (if given)
          engine_meta.json  world size, ZeRO stage, step, parameter shapes, size + sha256 of
                            every file above: written last, inside the temporary folder
    <tag>.universal/        universal-checkpoint conversion, made on demand at a new world size

A save goes to ``.tmp-<tag>`` and is renamed to ``<tag>`` only once complete; ``latest`` is then
replaced (``checkpoint.CheckpointDir`` owns this protocol: publish, latest, retain, sweep). An
interrupted save leaves a ``.tmp-*`` folder that nothing reads (removed by the next save) and
``latest`` on the previous good checkpoint.

Unpickling: DeepSpeed's ``*.pt`` files are pickles and DeepSpeed loads them with
``weights_only=False``; we cannot avoid that for its own format. We only hand it files whose size
and sha256 match the manifest we wrote, and everything of ours is JSON or safetensors.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
import time
import warnings
from argparse import Namespace
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from trainer.config import (
    EngineConfig,
    ModelConfig,
    Precision,
    RunConfig,
    TrainSetup,
    batch_geometry,
    choice_names,
    save_config,
    to_dict,
)
from trainer.fileio import atomic_write_json, atomic_write_text, publish_mode, sha256_file, writing
from trainer.runtime import dist
from trainer.runtime.checkpoint import (
    CLIENT,
    CONFIG,
    EMA_FILE,
    LATEST,
    META,
    RNG,
    CheckpointDir,
    CheckpointError,
    capture_rng,
    model_mismatch,
    read_json,
    restore_rng,
    verify_file,
)
from trainer.runtime.ema import EMA
from trainer.runtime.lr import lr_at, segment_total

# --- DeepSpeed import with the CPU workarounds -------------------------------------------------------
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skip the accelerator probe and its warning
# torch 2.13 warns (FutureWarning) from inside ZeRO's collectives on every step.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|deepspeed)(\.|$)")

import deepspeed  # noqa: E402
import deepspeed.comm.torch  # noqa: E402,F401  (so sys.modules has it)
from deepspeed.utils import logger as _ds_logger  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: E402

# DeepSpeed JIT-compiles a shared-memory all-reduce op in init_distributed (measured here: 34 s
# with g++/ninja on a fresh machine; the note saw it segfault inference_all_reduce). ZeRO training
# never uses it. `import deepspeed.comm.torch as m` would bind torch itself (deepspeed.comm
# re-exports it), hence sys.modules.
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # type: ignore[attr-defined]
_ds_logger.setLevel(logging.WARNING)

FORMAT = 1
_UNIVERSAL_TAG = "uc"


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
def resolve_precision(precision: str) -> str:
    if precision == Precision.auto:
        return "bf16" if torch.cuda.is_available() else "fp32"
    if precision not in choice_names(Precision):
        names = ", ".join(choice_names(Precision))
        raise ValueError(f"bad config key 'engine.precision': {precision!r} is not one of {names}")
    return str(precision)


def ds_config(setup: TrainSetup, engine: EngineConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for a stage's ``setup``; batch geometry errors name the stage's
    config key (``setup.key``.global_batch_size, ``.micro_batch_size``)."""
    optim, gbs = setup.optim, setup.global_batch_size
    micro, accum = batch_geometry(gbs, engine.micro_batch_size, world_size, key=setup.key)
    zero: dict[str, Any] = {"stage": engine.zero_stage}
    if engine.zero_stage == 3:
        # Parameters under 10^5 elements stay whole on every rank (DeepSpeed's default, written out
        # because tests rely on larger tensors being partitioned and smaller ones not).
        zero["stage3_param_persistence_threshold"] = int(1e5)
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    cfg: dict[str, Any] = {
        "train_batch_size": gbs,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "optimizer": {
            "type": "AdamW",
            # torch_adam: torch's AdamW. DeepSpeed's FusedAdam would JIT-compile (~75 s) first.
            "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                       "weight_decay": optim.weight_decay, "torch_adam": True, "adam_w_mode": True},
        },
        "zero_optimization": zero,
        "bf16": {"enabled": resolve_precision(engine.precision) == "bf16"},
        "checkpoint": {"load_universal": False},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if optim.grad_clip > 0:
        cfg["gradient_clipping"] = optim.grad_clip
    return cfg


# --------------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    base_lr: float
    warmup_steps: int
    total_steps: int
    kind: str
    min_lr_ratio: float
    segment: int = 0  # restart the decay's end every ``segment`` steps (lr.segment_total); 0 = never

    def __call__(self, step: int) -> float:
        total = segment_total(step, self.segment, self.total_steps)
        return lr_at(step, self.base_lr, self.warmup_steps, total, self.kind, self.min_lr_ratio)


class Engine:
    """A DeepSpeed engine plus what a training loop needs around it: lr schedule, EMA, atomic and
    verified checkpoints. ``step`` counts optimizer steps done (and is what checkpoints store)."""

    def __init__(self, ds_engine: Any, schedule: Schedule, micro_batch: int, grad_accum: int,
                 zero_stage: int, precision: str, ema: EMA | None):
        self.ds = ds_engine
        self.schedule = schedule
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.zero_stage = zero_stage
        self.precision = precision
        self.ema = ema
        self.step = 0
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        if ema is not None:
            self._update_ema()  # the EMA starts at the initial weights

    # ---- model access ---------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The underlying model (parameters are partitioned placeholders under ZeRO-3)."""
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward through DeepSpeed (ZeRO-3 gathers parameters in its hooks)."""
        return self.ds(*args, **kwargs)

    def train(self, mode: bool = True) -> Engine:
        self.ds.train(mode)
        return self

    def eval(self) -> Engine:
        return self.train(False)

    def lr(self) -> float:
        """Rate the next optimizer step will use."""
        return self.schedule(self.step)

    # ---- training -------------------------------------------------------------------------------
    def train_step(self, loss_fn: Callable[[Engine, Any], torch.Tensor],
                   micro_batches: Sequence[Any]) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches.

        ``loss_fn(engine, micro_batch)`` returns this rank's mean loss on the micro-batch (call
        ``engine(x)`` for the forward). Returns the loss averaged over micro-batches and ranks, the
        global gradient norm before clipping, and the lr used.
        """
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"train_step needs {self.grad_accum} micro-batches (gradient accumulation), "
                             f"got {len(micro_batches)}")
        lr = self.schedule(self.step)
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        self.ds.train()
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        own_norm = None
        for i, mb in enumerate(micro_batches):
            loss = loss_fn(self, mb)
            self.ds.backward(loss)  # DeepSpeed scales by 1 / grad_accum; all-reduces on the boundary
            if i == len(micro_batches) - 1 and self.zero_stage == 0 and self.precision == "fp32":
                own_norm = self._grad_norm()  # DeepSpeed records no norm on this path
            self.ds.step()  # steps the optimizer only on the accumulation boundary
            total += loss.detach().float()
        self.step += 1
        if self.ema is not None:
            self._update_ema()
        norm = own_norm if own_norm is not None else self.ds.get_global_grad_norm()
        return {"loss": dist.all_reduce_mean(total.item() / self.grad_accum),
                "grad_norm": float(norm) if norm is not None else float("nan"),
                "lr": lr}

    def _grad_norm(self) -> float:
        norms = [p.grad.detach().float().norm() for p in self.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0

    # ---- full parameters --------------------------------------------------------------------------
    def _full_params(self, chunk_numel: int = 1 << 26) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full parameter as used by forward). Collective under ZeRO-3: every rank must
        consume the whole iterator. Gathers at most ~``chunk_numel`` elements at a time."""
        named = list(self.module.named_parameters())
        if self.zero_stage < 3:
            yield from ((n, p.detach()) for n, p in named)
            return
        chunk: list[tuple[str, nn.Parameter]] = []
        size = 0
        for i, (n, p) in enumerate(named):
            chunk.append((n, p))
            size += p.ds_numel
            if size >= chunk_numel or i == len(named) - 1:
                with deepspeed.zero.GatheredParameters([q for _, q in chunk]):
                    for cn, cp in chunk:
                        yield cn, cp.detach()
                chunk, size = [], 0

    def _update_ema(self) -> None:
        assert self.ema is not None
        self.ema.update(self._full_params())

    def param_shapes(self) -> dict[str, list[int]]:
        return {n: list(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
                for n, p in self.module.named_parameters()}

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights plus buffers, on CPU. Collective: call on every rank.

        ZeRO 1-3: the optimizer's fp32 master weights. Stage 0: the module's weights (fp32 on CPU;
        with bf16, DeepSpeed's FP16_UnfusedOptimizer offers no full-fp32 accessor, so the bf16
        weights upcast, which is also what its checkpoint's module state holds)."""
        out: dict[str, torch.Tensor] = {}
        for n, p in self.module.named_parameters():
            hp = safe_get_full_fp32_param(p)  # None at stage 0 (no hp mapping)
            if hp is None:
                if self.zero_stage == 3:
                    with deepspeed.zero.GatheredParameters([p]):
                        hp = p.detach().clone()
                else:
                    hp = p.detach()
            out[n] = hp.to("cpu", torch.float32, copy=True)
        out.update(self._buffers())
        return out

    def _buffers(self) -> dict[str, torch.Tensor]:
        """Persistent buffers (never partitioned by ZeRO), as CPU copies."""
        params = {n for n, _ in self.module.named_parameters(remove_duplicate=False)}
        return {n: b.detach().to("cpu", copy=True) for n, b in self.module.state_dict().items() if n not in params}

    def ema_state_dict(self) -> dict[str, torch.Tensor] | None:
        """EMA weights plus the model's current buffers: a complete state dict like
        ``consolidated_state_dict`` (same keys), ready for export. Not collective."""
        if self.ema is None:
            return None
        return {**self.ema.state_dict(), **self._buffers()}

    # ---- checkpoints ----------------------------------------------------------------------------
    def save(self, ckpt_root: str | Path, tag: str, client_state: Mapping[str, Any] | None = None, *,
             config: RunConfig | None = None, keep: int = 0) -> Path:
        """Save a checkpoint; call on EVERY rank. ``client_state`` must be JSON-serialisable.
        ``keep`` > 0 deletes all but the newest ``keep`` checkpoints (never the latest).

        A full disk on a rank raises ``DiskFull`` naming the checkpoint: the partial save is only in
        ``.tmp-<tag>`` (nothing reads it; the next save of the tag or ``CheckpointDir.sweep`` removes it) and
        ``latest`` still names the previous complete checkpoint."""
        with writing(Path(ckpt_root) / tag):
            return self._save(ckpt_root, tag, client_state, config=config, keep=keep)

    def _save(self, ckpt_root: str | Path, tag: str, client_state: Mapping[str, Any] | None, *,
              config: RunConfig | None, keep: int) -> Path:
        ckpt = CheckpointDir(Path(ckpt_root))
        _check_tag(tag)
        client = dict(client_state or {})
        client_text = _to_json_text(client, "client_state")
        tmp = ckpt.tmp(tag)
        if self.rank == 0:
            ckpt.begin(tag)  # clears a leftover of an interrupted save of this tag
        rngs = dist.all_gather_object(capture_rng())
        dist.barrier()

        # DeepSpeed writes its shards from every rank; it must not touch `latest` (we do, last).
        with _quiet():
            self.ds.save_checkpoint(str(ckpt.root), tag=tmp.name, client_state={}, save_latest=False)
        if self.rank == 0:
            atomic_write_text(tmp / CLIENT, client_text)
            atomic_write_json(tmp / RNG, {"world_size": self.world_size, "ranks": rngs})
            if self.ema is not None:
                from safetensors.torch import save_file
                save_file(self.ema.state_dict(), tmp / EMA_FILE)
                publish_mode(tmp / EMA_FILE)
            if config is not None:
                save_config(config, tmp / CONFIG)
        dist.barrier()

        # Hash in parallel: rank r hashes every world_size-th file. Rank 0 publishes with the manifest.
        files = _list_files(tmp)
        mine = {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)}
                for f in files[self.rank::self.world_size]}
        manifest: dict[str, Any] = {}
        for part in dist.all_gather_object(mine):
            manifest.update(part)
        if self.rank == 0:
            meta = {
                "format": FORMAT, "tag": tag, "step": self.step, "world_size": self.world_size,
                "zero_stage": self.zero_stage, "precision": self.precision, "params": self.param_shapes(),
                "model": to_dict(config.model) if config is not None else None,
                "has_ema": self.ema is not None, "files": manifest, "time": time.time(),
            }
            ckpt.publish(tmp, tag, meta, keep)
        dist.barrier()
        return ckpt.root / tag

    def load(self, ckpt_root: str | Path, *, expect_model: ModelConfig | None = None,
             tag: str | None = None) -> dict[str, Any] | None:
        """Resume from ``latest`` (or ``tag``); returns the saved client_state, or None when there is
        no checkpoint. Call on EVERY rank. A different world size goes through a universal
        checkpoint (ZeRO 1-3; stage 0 state is not sharded and loads directly), after which the
        weights are checked against the checkpoint's consolidated fp32 weights."""
        ckpt = CheckpointDir(Path(ckpt_root))
        root = ckpt.root
        if tag is None:
            tag = ckpt.latest()
            if tag is None:
                return None
        tag_dir = root / tag
        meta = _collective(lambda: self._check_meta(tag_dir, expect_model), "checkpoint metadata")
        _collective(lambda: self._verify_files(tag_dir, meta["files"]), "checkpoint files")

        cross = meta["world_size"] != self.world_size
        if cross and self.zero_stage > 0:
            _collective(lambda: self._universal(root, tag) if self.rank == 0 else None,
                        "universal checkpoint conversion")
            uc_root = ckpt.universal(tag)
            self.ds._config.load_universal_checkpoint = True  # read per call by DeepSpeed
            try:
                with _quiet():
                    path, _ = self.ds.load_checkpoint(str(uc_root), tag=_UNIVERSAL_TAG)
            finally:
                self.ds._config.load_universal_checkpoint = False
        else:
            with _quiet():
                path, _ = self.ds.load_checkpoint(str(root), tag=tag)
        if path is None:
            raise CheckpointError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
        if cross:
            # load_module_only-style traps restore nothing silently: compare what we now hold.
            self._verify_weights(tag_dir)

        self.step = int(meta["step"])
        if self.ema is not None:
            self._load_ema(tag_dir, meta)
        rng = read_json(tag_dir / RNG)
        if rng["world_size"] == self.world_size:
            restore_rng(rng["ranks"][self.rank])
        elif self.rank < len(rng["ranks"]):
            restore_rng(rng["ranks"][self.rank])  # best effort: new ranks keep their seeded state
        client = read_json(tag_dir / CLIENT)
        dist.barrier()
        return client

    # ---- load helpers ---------------------------------------------------------------------------
    def _check_meta(self, tag_dir: Path, expect_model: ModelConfig | None) -> dict[str, Any]:
        if not tag_dir.is_dir():
            raise CheckpointError(f"{tag_dir}: checkpoint folder missing (named by {tag_dir.parent / LATEST})")
        meta = read_json(tag_dir / META)
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{tag_dir / META}: unknown checkpoint format {meta.get('format')!r}")
        if expect_model is not None and meta.get("model") is not None:
            diff = model_mismatch(meta["model"], expect_model)
            if diff:
                raise CheckpointError(f"{tag_dir / META}: checkpoint is for another model shape: {'; '.join(diff)}")
        stored, current = meta["params"], self.param_shapes()
        if stored != current:
            names = sorted(set(stored) ^ set(current))
            if names:
                why = f"parameter names differ: {', '.join(names[:5])}"
            else:
                n = next(k for k in current if stored[k] != current[k])
                why = f"parameter '{n}' has shape {stored[n]} in the checkpoint, {current[n]} in the model"
            raise CheckpointError(f"{tag_dir / META}: checkpoint does not fit this model: {why}")
        if meta["zero_stage"] != self.zero_stage:
            # DeepSpeed's universal checkpoints keep the source stage's file names, which another
            # stage does not look for (measured: 2 -> 3 fails inside DeepSpeed).
            raise CheckpointError(f"{tag_dir / META}: written with engine.zero_stage={meta['zero_stage']}, this "
                                  f"run uses {self.zero_stage}; resume with the same stage")
        return meta

    def _verify_files(self, tag_dir: Path, files: Mapping[str, Any]) -> None:
        names = sorted(files)
        for name in names[self.rank::self.world_size]:
            verify_file(tag_dir / name, files[name])

    def _universal(self, root: Path, tag: str) -> Path:
        """Convert ``<tag>`` to ``<tag>.universal/uc`` once (rank 0; temp folder then rename)."""
        out = CheckpointDir(root).universal(tag)
        if (out / _UNIVERSAL_TAG).is_dir():
            return out
        from deepspeed.checkpoint import ds_to_universal

        tmp = CheckpointDir(root).tmp(out.name)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        args = Namespace(input_folder=str(root / tag), output_folder=str(tmp / _UNIVERSAL_TAG),
                         num_extract_workers=1, num_merge_workers=1,  # no fork from a process with gloo threads
                         keep_temp_folder=False, strict=True, inject_missing_state=True)
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                ds_to_universal.main(args)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{root / tag}: universal checkpoint conversion failed: {e!r}\n"
                                  f"{log.getvalue()[-2000:]}") from e
        os.replace(tmp, out)
        return out

    def _verify_weights(self, tag_dir: Path) -> None:
        """Both copies must equal the checkpoint's consolidated fp32 weights: the optimizer's fp32
        master (exactly) and the weights forward uses (after rounding to their dtype)."""
        master = self.consolidated_state_dict()  # collective
        ref = consolidated_state_dict(tag_dir, verify=False) if self.rank == 0 else {}
        err = None
        for name, p in self._full_params():  # collective under ZeRO-3: every rank iterates all
            if self.rank != 0 or err or name not in ref:
                continue
            r = ref[name]
            for what, t in (("fp32 master weights", master[name]), ("module weights", p)):
                if t.shape != r.shape:
                    err = f"{what} of '{name}' have shape {list(t.shape)}, the checkpoint {list(r.shape)}"
                elif not torch.equal(t.cpu(), r.to(t.dtype)):
                    diff = (t.cpu().float() - r.float()).abs().max().item()
                    err = f"{what} of '{name}' differ (max abs diff {diff:.3g})"
                if err:
                    err = (f"{tag_dir}: after loading, the {err} from the checkpoint's consolidated fp32 "
                           "weights: the load restored the wrong values or none")
                    break
        err = dist.broadcast_object(err)
        if err:
            raise CheckpointError(err)

    def _load_ema(self, tag_dir: Path, meta: Mapping[str, Any]) -> None:
        assert self.ema is not None
        if not meta.get("has_ema"):  # start the EMA at the loaded weights
            self.ema.shadow = {}
            self._update_ema()
            return
        from safetensors.torch import load_file
        shapes = {k: tuple(v) for k, v in meta["params"].items()}
        self.ema.load_state_dict(load_file(tag_dir / EMA_FILE), device=self.device,
                                 expect_shapes=shapes, source=str(tag_dir / EMA_FILE))


def build_engine(model: nn.Module, setup: TrainSetup, engine: EngineConfig, total_steps: int,
                 world_size: int) -> Engine:
    """Wrap ``model`` in DeepSpeed ZeRO with a stage's ``setup`` (config.pretrain_setup /
    distill_setup; ``setup.ema`` 0 disables the EMA). The process group must exist
    (``dist.init_distributed``)."""
    if not tdist.is_initialized():
        raise RuntimeError("build_engine: call trainer.runtime.dist.init_distributed() first")
    if world_size != tdist.get_world_size():
        raise ValueError(f"build_engine: world_size={world_size} but the process group has "
                         f"{tdist.get_world_size()} ranks")
    config = ds_config(setup, engine, world_size)
    precision = resolve_precision(engine.precision)
    optim = setup.optim
    schedule = Schedule(base_lr=optim.lr, warmup_steps=optim.warmup_steps, total_steps=total_steps,
                        kind=optim.schedule, min_lr_ratio=optim.min_lr_ratio, segment=setup.schedule_segment)
    # A no-op when the group exists (dist.init_distributed made it with the same timeout).
    deepspeed.init_distributed(dist_backend=tdist.get_backend(), verbose=False,
                               timeout=timedelta(seconds=engine.collective_timeout_s))
    with _quiet():
        ds_engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    ema = EMA(setup.ema) if setup.ema else None
    return Engine(ds_engine, schedule, config["train_micro_batch_size_per_gpu"],
                  config["gradient_accumulation_steps"], engine.zero_stage, precision, ema)


def consolidated_state_dict(src: Engine | str | Path, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """Full fp32 weights from an engine (collective) or a checkpoint folder ``<root>/<tag>``
    (any process, no process group needed; files verified against the manifest first)."""
    if isinstance(src, Engine):
        return src.consolidated_state_dict()
    tag_dir = Path(src)
    meta = read_json(tag_dir / META)
    if verify:
        for name, entry in meta["files"].items():
            verify_file(tag_dir / name, entry)
    if meta["zero_stage"] == 0:
        # Plain DeepSpeed layout: the module's weights sit in the model-states pickle. Load with
        # weights_only (it holds only tensors, containers and primitives; no code).
        sd = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
        return {k: v.float() for k, v in sd.items()}
    with _quiet():
        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k: v.contiguous() for k, v in sd.items()}


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DeepSpeed prints progress lines and bars (stdout, tqdm on stderr) and routine warnings on
    init/save/load; keep job logs readable. Exceptions still propagate. SDTT_DS_VERBOSE=1 shows all."""
    if os.environ.get("SDTT_DS_VERBOSE"):
        yield
        return
    level = _ds_logger.level
    _ds_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        _ds_logger.setLevel(level)


def _check_tag(tag: str) -> None:
    if not tag or "/" in tag or tag.startswith(".") or tag == LATEST or tag.endswith(".universal"):
        raise ValueError(f"bad checkpoint tag {tag!r} (plain name, no '/', not starting with '.')")


def _to_json_text(obj: Any, what: str) -> str:
    import json
    try:
        return json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n"
    except TypeError as e:
        raise TypeError(f"{what} must be JSON-serialisable (numbers, strings, lists, dicts): {e}") from None


def _list_files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def _collective(fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn`` on every rank; if any rank fails, every rank raises the first error (no hang)."""
    cause: BaseException | None = None
    try:
        out, err = fn(), None
    except CheckpointError as e:
        out, err, cause = None, str(e), e
    except Exception as e:  # noqa: BLE001  (anything else must not leave the other ranks waiting)
        out, err, cause = None, f"{what}: {type(e).__name__}: {e}", e
    errors = [e for e in dist.all_gather_object(err) if e]
    if errors:
        raise CheckpointError(errors[0]) from cause
    return out
