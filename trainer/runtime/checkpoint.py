"""Train state that is not DeepSpeed's business, and the exported-weights format every job loads.

* The checkpoint folder's protocol (:class:`CheckpointDir`): where a save is written, how it is
  published (manifest, swap, ``latest``), which checkpoints are kept, what is swept. The engine
  writes DeepSpeed's files into it and calls it; readers (resume, round planning) read it.
* RNG state (python, numpy, torch CPU, CUDA) as JSON-able plain values, so it can sit in a JSON
  file next to a checkpoint instead of inside a pickle.
* Exports: ``<dir>/model.safetensors`` (raw), ``ema.safetensors``, ``config.yaml`` (the resolved
  RunConfig) and ``export.json`` (sha256 and size of each file, step, parameter count, shapes),
  written to a temporary folder and renamed into place, so a reader sees a whole export or none.

No deepspeed import here (engine.py is the only one), and no pickle: safetensors, YAML and JSON.
"""
from __future__ import annotations

import random
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer import fileio
from trainer.config import ModelConfig, RunConfig, load_config, save_config, to_dict
from trainer.errors import BadInput
from trainer.fileio import (
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    publish_mode,
    replace_dir,
    sha256_file,
    writing,
)

EXPORT_FORMAT = 1
WEIGHT_FILES = {"raw": "model.safetensors", "ema": "ema.safetensors"}

# A checkpoint folder (``<model>/checkpoints``): one sub-folder per tag (DeepSpeed's files plus the
# ones below) and ``latest``, the tag of the newest complete checkpoint, written last (CheckpointDir).
LATEST = "latest"
META = "engine_meta.json"  # step, world size, ZeRO stage, model config, sha256 of every file
CLIENT = "client_state.json"  # the job's JSON state (data position, round, init)
RNG = "rng.json"
EMA_FILE = "ema.safetensors"
CONFIG = "config.yaml"


class CheckpointError(BadInput, RuntimeError):
    """A checkpoint or export that must not be loaded; the message names the file and the problem."""


def read_json(path: str | Path) -> Any:
    """A checkpoint's or export's JSON file; missing or corrupt raises CheckpointError naming it."""
    return fileio.read_json(path, CheckpointError)


@dataclass(frozen=True)
class CheckpointDir:
    """A checkpoint folder's protocol: where a save is written, how it is published, what is kept.

    A save is written (by every rank, into :meth:`tmp`) then handed to :meth:`publish` on one rank:
    the manifest goes in last, the folder is swapped into place, ``latest`` names it, old
    checkpoints beyond ``keep`` are retained away and the leftovers of interrupted saves swept. A
    reader therefore sees a whole checkpoint or the previous one, never a mix."""

    root: Path

    def latest(self) -> str | None:
        """The tag of the newest complete checkpoint, or None when there is none."""
        path = self.root / LATEST
        return path.read_text().strip() if path.is_file() else None

    def meta(self, tag: str) -> dict[str, Any]:
        return read_json(self.root / tag / META)

    def client_state_path(self, tag: str) -> Path:
        return self.root / tag / CLIENT

    def client_state(self, tag: str) -> dict[str, Any]:
        return read_json(self.client_state_path(tag))

    # ---- writing (the engine: every rank writes into tmp(tag), one rank publishes) ---------------
    def tmp(self, tag: str) -> Path:
        """Where a save of ``tag`` is written; nothing reads it, and the next save or sweep removes it."""
        return self.root / f".tmp-{tag}"

    def universal(self, tag: str) -> Path:
        """The universal-checkpoint conversion of ``tag`` (made on demand at a new world size)."""
        return self.root / f"{tag}.universal"

    def begin(self, tag: str) -> Path:
        """Make the folder and clear a leftover of an interrupted save of ``tag``; returns :meth:`tmp`.
        One rank, before any rank writes."""
        tmp = self.tmp(tag)
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        return tmp

    def publish(self, tmp: Path, tag: str, manifest: Mapping[str, Any], keep: int = 0) -> Path:
        """Publish the finished save in ``tmp`` as ``tag``; one rank, after every rank has written.

        ``manifest`` (engine_meta.json: the sha256 of every file) is written last inside ``tmp``; the
        folder is then swapped into place (re-saving a tag replaces it whole), the conversion derived
        from an older ``tag`` dropped, ``latest`` rewritten; ``keep`` > 0 deletes all but the newest
        ``keep`` checkpoints (never the latest); leftovers are swept."""
        atomic_write_json(tmp / META, dict(manifest))
        final = self.root / tag
        replace_dir(tmp, final)
        shutil.rmtree(self.universal(tag), ignore_errors=True)  # derived from the old one
        atomic_write_text(self.root / LATEST, tag + "\n")
        if keep > 0:
            self.retain(keep)
        self.sweep()
        return final

    def retain(self, keep: int) -> None:
        """Delete all but the newest ``keep`` complete checkpoints, never the one `latest` names."""
        latest = self.latest()
        found = []
        for d in self.root.iterdir():
            if d.is_dir() and not d.name.startswith(".") and (d / META).is_file():
                try:
                    step = int(read_json(d / META)["step"])
                except (CheckpointError, KeyError, ValueError):
                    step = -1
                found.append((step, d.stat().st_mtime, d.name))
        found.sort(reverse=True)
        keep_names = {name for _, _, name in found[:keep]} | ({latest} if latest else set())
        for _, _, name in found:
            if name not in keep_names:
                shutil.rmtree(self.root / name, ignore_errors=True)

    def sweep(self) -> None:
        """Remove leftovers of interrupted saves, swaps and conversions, and conversions of deleted
        checkpoints. Runs at the end of a publish, when no other save or conversion can be in flight.
        (``.trash-`` is the aside name of swaps made before ``fileio.replace_dir`` did them.)"""
        for d in self.root.iterdir():
            if d.name.startswith((".tmp-", ".old-", ".trash-")):
                shutil.rmtree(d, ignore_errors=True)
            elif d.name.endswith(".universal") and not (self.root / d.name.removesuffix(".universal")).is_dir():
                shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """This process's global RNG states as JSON-able values (lists, ints, hex strings)."""
    version, state, gauss = random.getstate()
    key, mt, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": [version, list(state), gauss],
        "numpy": [key, mt.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().numpy().tobytes().hex(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.numpy().tobytes().hex() for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: Mapping[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    key, mt_np, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((key, np.asarray(mt_np, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray.fromhex(state["torch"]), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [torch.frombuffer(bytearray.fromhex(s), dtype=torch.uint8) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------------------------------
# Exported weights
# --------------------------------------------------------------------------------------------------
def _plain(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: give it private contiguous CPU copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def export_weights(out_dir: str | Path, raw_state_dict: Mapping[str, torch.Tensor],
                   ema_state_dict: Mapping[str, torch.Tensor], cfg: RunConfig, step: int,
                   *, overwrite: bool = False, kind: str = "dit") -> Path:
    """Write an export folder atomically; refuse to touch an existing one unless ``overwrite``.

    ``kind`` (export.json's ``model``) says what the weights build: ``dit``, or the exact teacher of a
    Markov source (``trainer.model.oracle.KIND``), whose "weights" are the chain's parameters.

    With ``overwrite`` the new export is complete on disk before the old one is moved aside, so
    the folder never holds a mix of two exports.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: an export already exists (pass overwrite=True to replace it)")
    raw, ema = _plain(raw_state_dict), _plain(ema_state_dict)
    if {k: tuple(v.shape) for k, v in raw.items()} != {k: tuple(v.shape) for k, v in ema.items()}:
        raise ValueError("export_weights: the raw and EMA state dicts have different keys or shapes")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with writing(out_dir):  # a full disk: DiskFull naming the export; the old export stays whole
        _write_export(out_dir, raw, ema, cfg, step, kind)
    return out_dir


def _write_export(out_dir: Path, raw: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], cfg: RunConfig,
                  step: int, kind: str) -> None:
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".tmp-{out_dir.name}-"))
    try:
        meta = {"format": "sdtt-export"}
        save_file(raw, tmp / WEIGHT_FILES["raw"], metadata=meta)
        save_file(ema, tmp / WEIGHT_FILES["ema"], metadata=meta)
        save_config(cfg, tmp / "config.yaml")
        files = {}
        for name in (*WEIGHT_FILES.values(), "config.yaml"):
            files[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
        info = {
            "format": EXPORT_FORMAT,
            "model": kind,
            "step": int(step),
            "param_count": int(sum(v.numel() for v in raw.values())),
            "shapes": {k: list(v.shape) for k, v in raw.items()},
            "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in raw.items()},
            "files": files,
            "created": time.time(),
        }
        atomic_write_json(tmp / "export.json", info)
        for f in (tmp, *tmp.iterdir()):
            publish_mode(f)
        fsync_dir(tmp)
        replace_dir(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_mismatch(stored: ModelConfig | Mapping[str, Any], expected: ModelConfig | Mapping[str, Any]) -> list[str]:
    """``["model.d_model: stored 128, expected 256", ...]``; empty when the shapes agree."""
    a = stored if isinstance(stored, Mapping) else to_dict(stored)
    b = expected if isinstance(expected, Mapping) else to_dict(expected)
    return [f"model.{k}: stored {a.get(k)!r}, expected {b.get(k)!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def verify_file(path: Path, entry: Mapping[str, Any]) -> None:
    """Size then sha256 against a manifest entry; a CheckpointError names the file."""
    reason = fileio.verify_file(path, entry)
    if reason is not None:
        raise CheckpointError(f"{path}: {reason}" + (" (listed in the manifest)" if reason == "missing" else ""))


def load_exported(export_dir: str | Path, which: str = "ema", expect_model: ModelConfig | None = None
                  ) -> tuple[dict[str, torch.Tensor], RunConfig]:
    """Load one weight file of an export, verified against export.json (sha256, names, shapes)."""
    export_dir = Path(export_dir)
    if which not in WEIGHT_FILES:
        raise ValueError(f"which must be one of {', '.join(WEIGHT_FILES)}, got {which!r}")
    info = read_json(export_dir / "export.json")
    name = WEIGHT_FILES[which]
    for fname in (name, "config.yaml"):
        if fname not in info.get("files", {}):
            raise CheckpointError(f"{export_dir / 'export.json'}: has no entry for {fname}")
        verify_file(export_dir / fname, info["files"][fname])

    cfg = load_config(export_dir / "config.yaml")
    if expect_model is not None:
        diff = model_mismatch(cfg.model, expect_model)
        if diff:
            raise CheckpointError(f"{export_dir / 'config.yaml'}: model shape differs from the expected "
                                  f"one: {'; '.join(diff)}")
    try:
        sd = load_file(export_dir / name)
    except SafetensorError as e:
        raise CheckpointError(f"{export_dir / name}: unreadable safetensors file ({e})") from None
    shapes = {k: list(v.shape) for k, v in sd.items()}
    if shapes != info["shapes"]:
        bad = sorted(set(shapes) ^ set(info["shapes"])) or \
            [k for k in shapes if shapes[k] != info["shapes"][k]]
        raise CheckpointError(f"{export_dir / name}: tensors disagree with export.json at "
                              f"{', '.join(bad[:5])}")
    return sd, cfg


def load_weight_file(path: str | Path, expect_model: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """``load_exported`` of the export that holds weight file ``path`` (``<export>/ema.safetensors`` or
    ``model.safetensors``), verified the same way; the state dict alone."""
    path = Path(path)
    which = {name: w for w, name in WEIGHT_FILES.items()}.get(path.name)
    if which is None:
        raise CheckpointError(f"{path}: not an export's weight file ({', '.join(WEIGHT_FILES.values())})")
    return load_exported(path.parent, which, expect_model)[0]


def export_kind(export_dir: str | Path) -> str:
    """What an export's weights build (export.json's ``model``): ``dit`` (also for exports written
    before the field existed) or ``trainer.model.oracle.KIND``."""
    return str(read_json(Path(export_dir) / "export.json").get("model", "dit"))


def load_model(export_dir: str | Path, weights: str = "ema", expect_model: ModelConfig | None = None,
               causal: bool = False) -> tuple[torch.nn.Module, RunConfig]:
    """An exported model, verified (sha256, names, shapes), in eval mode on CPU: (model, its config).
    A DiT, or the exact teacher of a Markov source (``export_kind``), which has the DiT's forward."""
    from trainer.model import oracle
    from trainer.model.dit import DiT

    state, cfg = load_exported(export_dir, weights, expect_model)
    if export_kind(export_dir) == oracle.KIND:
        if causal:
            raise CheckpointError(f"{export_dir}: the exact teacher of a Markov source has no causal form")
        return oracle.MarkovOracle.from_state(state, cfg.data.seq_len).eval(), cfg
    model = DiT(cfg.model, causal=causal)
    model.load_state_dict(state)
    return model.eval(), cfg
