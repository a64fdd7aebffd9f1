"""Target codecs: how a teacher distribution over the vocabulary is stored for each masked position.

An SDTT target is a full distribution over V tokens at every masked position; with GPT-2's vocabulary
that is ~200 KB per position in fp32, so the offline target set needs a sparse code
(measured trade-offs: docs/benchmarks.md, storage). Four codecs, chosen by ``targets.codec``, one
module each: ``dense`` (exact), ``topk`` (top-K + the tail's mass), ``topk_is`` (topk + K
importance-sampled tail ids), ``sampled`` (K draws, stored as distinct ids and counts). Each module
holds one ``Codec`` object, ``CODEC`` (its fields, bytes per position, encode, decode), and its decoded
``Targets`` (which know the divergence their code serves). ``REGISTRY`` is found, not listed: for each
name declared in trainer.config.Codec, the module of that name here and its ``CODEC``;
trainer.config.PAIRS says which divergences each serves.

All codecs encode only the M masked positions of a sequence, in position order. Ids are stored as
uint16 when the vocabulary fits (V <= 65,536, GPT-2 included: 2 bytes instead of 4 per id) and as
int32 otherwise; ``decode`` always returns int64. Counts and ``nuniq`` are uint8 when K <= 255.

Only npy-friendly numeric arrays: a shard never needs pickle. The divergences that go with each code
live in trainer/method/divergences.py, so the pairing is tested in one place.

``python tools/inspect_shards.py --sizes [--config FILE]`` prints bytes per stored position.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from trainer.config import Codec as CodecName
from trainer.config import choice_names
from trainer.method.codecs.base import GPT2_VOCAB, Codec, CodecError, Targets, count_dtype, id_dtype
from trainer.method.codecs.dense import DenseTargets
from trainer.method.codecs.sampled import SampledTargets
from trainer.method.codecs.topk import TopKTargets
from trainer.method.codecs.topk_is import TopKISTargets

__all__ = ["CODECS", "GPT2_VOCAB", "REGISTRY", "Codec", "CodecError", "DenseTargets", "SampledTargets",
           "Targets", "TopKISTargets", "TopKTargets", "bytes_per_position", "count_dtype", "decode", "encode",
           "encode_rows", "expected_distinct", "get", "id_dtype", "stats"]

CODECS = choice_names(CodecName)  # declared in trainer/config.py


def _registered(name: str) -> Codec:
    """Codec ``name``: ``CODEC`` of this package's module of that name (a new codec is a module here
    and its name in trainer.config.Codec, with no list of codecs to edit)."""
    codec = importlib.import_module(f"{__name__}.{name}").CODEC
    if codec.name != name:
        raise CodecError(f"{__name__}.{name}.CODEC is named '{codec.name}', not '{name}'")
    return codec


REGISTRY: dict[str, Codec] = {name: _registered(name) for name in CODECS}


def get(codec: str) -> Codec:
    """The registered codec of that name; a CodecError naming the choices otherwise."""
    if codec not in REGISTRY:
        raise CodecError(f"unknown codec '{codec}' (expected one of {', '.join(CODECS)})")
    return REGISTRY[codec]


def bytes_per_position(codec: str, k: int, vocab: int, distinct: float | None = None) -> float:
    """Payload bytes stored per masked position (codec fields only; npy/tar headers not included).

    For ``sampled`` the size depends on the number of distinct ids per position: pass the mean
    ``distinct`` (measured, or ``expected_distinct``); by default the worst case, K distinct ids.
    """
    return get(codec).bytes_per_position(k, vocab, distinct)


def expected_distinct(probs: Tensor, k: int) -> Tensor:
    """Expected number of distinct ids among K draws from each row of ``probs`` [..., V]:
    sum_v 1 - (1 - p_v)^K (exact, float64)."""
    p = probs.double()
    return (1.0 - torch.exp(k * torch.log1p(-p.clamp(max=1.0)))).sum(-1)


def encode(log_probs: Tensor, codec: str, k: int, generator: torch.Generator | None = None
           ) -> dict[str, np.ndarray]:
    """Encode the teacher log-probs [M, V] (real tokens only, MASK column dropped) of M positions.

    ``generator`` (a CPU generator) is needed by the codecs that draw (``Codec.needs_generator``) only.
    """
    c = get(codec)
    if log_probs.dim() != 2:
        raise CodecError(f"{codec}: expected log-probs [M, V], got shape {tuple(log_probs.shape)}")
    return c.encode(log_probs, k, log_probs.shape[1], generator)


def encode_rows(log_probs: Tensor, rows: Sequence[int], codec: str, k: int,
                generators: Sequence[torch.Generator] | None = None) -> list[dict[str, np.ndarray]]:
    """Encode the masked positions of a batch: ``log_probs`` [N, V] holds sample b's ``rows[b]``
    positions after sample a's for a < b; returns one field dict per sample.

    The deterministic codecs (topk, dense) encode every row in one call and split the result: one
    top-K and three device-to-host copies per batch instead of per sample (on a GPU each copy is a
    synchronisation). The codecs that draw (sampled, topk_is) encode sample by sample with
    ``generators[b]``, so their draws do not depend on the batch.
    """
    if sum(rows) != log_probs.shape[0]:
        raise CodecError(f"{codec}: {log_probs.shape[0]} rows of log-probs for {sum(rows)} positions")
    if get(codec).needs_generator:
        if generators is None or len(generators) != len(rows):
            raise CodecError(f"{codec}: one torch.Generator per sample is required")
        return [encode(part, codec, k, g) for part, g in zip(log_probs.split(list(rows)), generators)]
    fields = encode(log_probs, codec, k)
    bounds = np.cumsum([0, *rows])
    return [{name: arr[a:b] for name, arr in fields.items()} for a, b in zip(bounds[:-1], bounds[1:])]


def decode(fields: Mapping[str, np.ndarray], codec: str, vocab: int, k: int,
           device: torch.device | str = "cpu") -> Targets:
    """Turn one sample's codec fields back into torch targets for its M masked positions."""
    c = get(codec)
    missing = [f for f in c.fields if f not in fields]
    if missing:
        raise CodecError(f"{codec}: missing field(s) {', '.join(missing)}")
    return c.decode(fields, vocab, k, device)


def stats(fields: Mapping[str, np.ndarray], codec: str) -> dict[str, float]:
    """Per-sample sums for the manifest and inspect_shards: positions, payload bytes, tail mass
    (topk) or distinct ids (sampled)."""
    c = get(codec)
    out = {"payload_bytes": float(sum(np.asarray(fields[f]).nbytes for f in c.fields))}
    out["positions"] = float(fields[c.positions_field].shape[0])
    out.update(c.position_sums(fields))
    return out
