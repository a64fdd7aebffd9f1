"""What determines a round's target set: one function for the writer and the reader.

The targets job stores ``describe(...) | sharding(...)`` as the set's header (plan.json, then the
manifest's header fields); the distill job recomputes ``describe(...)`` from its own config and
``check``s the manifest against it, naming every differing field and where its value comes from
(``sources``). The benchmarks build the same ``example_spec``. No I/O here.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import RunConfig, round_steps
from trainer.method import divergences, sdtt
from trainer.targets.shards import FORMAT, ShardError

ROWS = "train[perm(seed, round, i // N)[i % N]]"  # how sample i picks its clean row (trainer/data/rows.py)


class ManifestMismatch(ShardError):
    """The target set was made for another student (the message names the field and both values)."""


@dataclass(frozen=True)
class TeacherId:
    """The weights a target set was made from: export folder (run-relative where possible), which
    weight file (``ema``/``raw``) and its sha256."""

    export: str
    weights: str
    sha256: str


def example_spec(cfg: RunConfig, round_idx: int, *, codec: str | None = None, k: int | None = None
                 ) -> sdtt.ExampleSpec:
    """Round ``round_idx``'s training examples: the student steps N_r = distill.start_steps / 2**r,
    the teacher's m = targets.teacher_steps steps of dt = (1 - sampling_eps) / (m N_r) replace one
    student step (sdtt.teacher_dt). ``codec``/``k`` default to targets.codec/targets.k (the online
    student uses dense targets: codec="dense", k=V)."""
    g = cfg.targets
    return sdtt.ExampleSpec(
        seed=cfg.seed, round_idx=round_idx,
        dt=sdtt.teacher_dt(round_steps(cfg, round_idx), g.teacher_steps, cfg.diffusion.sampling_eps),
        teacher_steps=g.teacher_steps, mask_id=cfg.model.vocab_size, noise_eps=cfg.diffusion.noise_eps,
        train_eps=cfg.diffusion.train_eps, t_min=cfg.diffusion.sampling_eps,
        codec=str(codec if codec is not None else g.codec), k=k if k is not None else g.k)  # the plain name


def describe(cfg: RunConfig, round_idx: int, teacher: TeacherId, data_info: Mapping[str, Any]) -> dict[str, Any]:
    """What determines the content of round ``round_idx``'s target set; the writer stores it and
    the reader requires it verbatim."""
    spec = example_spec(cfg, round_idx)
    return {
        "format": FORMAT,
        "teacher": teacher.export,
        "teacher_weights": teacher.weights,
        "teacher_sha256": teacher.sha256,
        "data_digest": data_info["digest"],
        "tokenizer": data_info["tokenizer"],
        "seed": spec.seed,
        "round": round_idx,
        "student_steps": round_steps(cfg, round_idx),
        "teacher_steps": spec.teacher_steps,
        "dt": spec.dt,
        "t_min": spec.t_min,
        "noise_eps": spec.noise_eps,
        "train_eps": spec.train_eps,
        "codec": spec.codec,
        "k": spec.k,
        "seq_len": cfg.data.seq_len,
        "vocab_size": cfg.model.vocab_size,
        "mask_id": spec.mask_id,
        "num_samples": cfg.targets.num_samples,
        "rows": ROWS,
    }


def sharding(cfg: RunConfig, samples_per_shard: int, prefix: str) -> dict[str, Any]:
    """How the set is cut and batched: stored in the header, not required by the reader (a sample's
    content does not depend on it)."""
    return {"samples_per_shard": samples_per_shard, "batch_size": cfg.targets.batch_size, "prefix": prefix}


def sources(data_json: Path | str, teacher_file: Path | str) -> dict[str, str]:
    """Where each field of ``describe`` comes from, for the mismatch message."""
    return {
        "round": "--round", "seq_len": "data.seq_len", "vocab_size": "model.vocab_size",
        "mask_id": "model.vocab_size", "tokenizer": str(data_json), "data_digest": str(data_json),
        "codec": "targets.codec", "k": "targets.k", "teacher_steps": "targets.teacher_steps",
        "student_steps": "distill.start_steps / 2**round",
        "dt": "distill.start_steps, targets.teacher_steps, diffusion.sampling_eps",
        "t_min": "diffusion.sampling_eps", "noise_eps": "diffusion.noise_eps", "train_eps": "diffusion.train_eps",
        "seed": "seed", "num_samples": "targets.num_samples", "teacher": "the export this round starts from",
        "teacher_weights": "targets.use_ema for round 1, distill.ema_as_teacher after",
        "teacher_sha256": f"sha256 of {teacher_file}, this round's teacher",
        "rows": "the targets job's row order", "format": "the target-set format this code reads",
    }


def check(manifest: Mapping[str, Any], expected: Mapping[str, Any], where: str | Path, divergence: str,
          why: Mapping[str, str] | None = None) -> None:
    """Refuse a set made for another student: every differing field is named with both values and
    where the expected one comes from (one run shows everything to fix); then the codec must pair
    with ``divergence`` and K fit the vocabulary."""
    why = why or {}
    diff = []
    for key, want in expected.items():
        have = manifest.get(key, "<missing>")
        if have != want:
            src = f" ({why[key]})" if key in why else ""
            diff.append(f"field '{key}': the target set has {have!r}, the student expects {want!r}{src}")
    if diff:
        raise ManifestMismatch(f"{where}: target set does not fit this student: " + "; ".join(diff))
    try:
        divergences.check_pairing(manifest["codec"], divergence)
    except ValueError as e:
        raise ManifestMismatch(f"{where}: field 'codec' ({manifest['codec']!r}, k={manifest['k']}): {e}") from None
    if not 1 <= int(manifest["k"]) <= int(manifest["vocab_size"]):
        raise ManifestMismatch(f"{where}: field 'k' is {manifest['k']}, outside [1, vocab_size="
                               f"{manifest['vocab_size']}]")
