"""Train state that is not DeepSpeed's business, and the exported-weights format every job loads.

* RNG state (python, numpy, torch CPU, CUDA) as JSON-able plain values, so it can sit in a JSON
  file next to a checkpoint instead of inside a pickle.
* Exports: ``<dir>/model.safetensors`` (raw), ``ema.safetensors``, ``config.yaml`` (the resolved
  RunConfig) and ``export.json`` (sha256 and size of each file, step, parameter count, shapes),
  written to a temporary folder and renamed into place, so a reader sees a whole export or none.

No deepspeed import here (engine.py is the only one), and no pickle: safetensors, YAML and JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.config import ModelConfig, RunConfig, load_config, save_config, to_dict

EXPORT_FORMAT = 1
WEIGHT_FILES = {"raw": "model.safetensors", "ema": "ema.safetensors"}


class CheckpointError(RuntimeError):
    """A checkpoint or export that must not be loaded; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------
# Small file helpers (shared with engine.py)
# --------------------------------------------------------------------------------------------------
def sha256_file(path: str | Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def publish_mode(path: str | Path) -> None:
    """Give a file made by mkstemp/mkdtemp (0600/0700) the mode a plain open() would have: other
    users of a shared run folder must be able to read checkpoints and exports."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_UMASK)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same folder + fsync + os.replace: never half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e})") from None


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
                   *, overwrite: bool = False) -> Path:
    """Write an export folder atomically; refuse to touch an existing one unless ``overwrite``.

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
        if out_dir.exists():  # overwrite: swap, then drop the old one
            old = out_dir.with_name(f".old-{out_dir.name}-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def model_mismatch(stored: ModelConfig | Mapping[str, Any], expected: ModelConfig | Mapping[str, Any]) -> list[str]:
    """``["model.d_model: stored 128, expected 256", ...]``; empty when the shapes agree."""
    a = stored if isinstance(stored, Mapping) else to_dict(stored)
    b = expected if isinstance(expected, Mapping) else to_dict(expected)
    return [f"model.{k}: stored {a.get(k)!r}, expected {b.get(k)!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def verify_file(path: Path, entry: Mapping[str, Any]) -> None:
    """Size then sha256 against a manifest entry; a CheckpointError names the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (listed in the manifest)")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CheckpointError(f"{path}: truncated or altered: {size} bytes, manifest says {entry['bytes']}")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise CheckpointError(f"{path}: corrupt: sha256 {digest[:16]}... does not match the manifest's "
                              f"{entry['sha256'][:16]}...")


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
