"""Inspect an SDTT target set: ``python tools/inspect_shards.py DIR [--verify] [--samples N]``, or the
codecs' sizes: ``python tools/inspect_shards.py --sizes [--config FILE] [--k K ...] [key=value ...]``.

Prints what produced the set (manifest: teacher, data digest, round, dt, codec, K), sample and
position counts, bytes per stored position (codec payload, and on disk with npy/tar headers), and
the codec's quality statistics from up to N samples: the teacher mass outside the stored top-K
(topk) or the distinct ids per position (sampled). ``--verify`` re-reads every shard against the
manifest (size, sha256) and exits 1 naming each bad one.

``--sizes`` prints the bytes per stored position of every codec and K for the config's vocabulary
and GPT-2's (with DIR: also the set's measured bytes per position).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.errors import BadInput  # noqa: E402
from trainer.method.codecs import GPT2_VOCAB, REGISTRY, get, id_dtype  # noqa: E402
from trainer.targets import shards  # noqa: E402


def size_table(vocab: int, ks: list[int], distinct: dict[int, float] | None = None) -> list[str]:
    """Rows of bytes per stored position for every codec and K."""
    rows = [f"vocabulary {vocab}: ids stored as {id_dtype(vocab).name}",
            f"  {'codec':<8} {'K':>6} {'bytes/position':>15}  note"]
    # The codecs without K (dense) first, then the others in their declared order, each over ks.
    for c in sorted(REGISTRY.values(), key=lambda c: c.uses_k):
        if not c.uses_k:
            note = c.size_row_note(1, vocab, None)
            rows.append(f"  {c.name:<8} {'-':>6} {c.bytes_per_position(1, vocab):>15,.0f}  {note}")
            continue
        for k in ks:
            if k > c.k_max(vocab):
                continue
            note = c.size_row_note(k, vocab, (distinct or {}).get(k))
            rows.append(f"  {c.name:<8} {k:>6} {c.bytes_per_position(k, vocab):>15,.0f}  {note}")
    return rows


def sample_stats(out_dir: Path, manifest: dict, max_samples: int) -> list[str]:
    """Quantiles of the codec's per-position statistics over the first ``max_samples`` samples."""
    codec, values, n = get(manifest["codec"]), [], 0
    for s in manifest["shards"]:
        if n >= max_samples:
            break
        try:
            for sample in shards.iter_samples(out_dir / s["name"]):
                v = codec.position_values(sample)
                if v is not None:
                    values.append(v)
                n += 1
                if n >= max_samples:
                    break
        except shards.ShardError as e:
            return [f"  (stopped reading: {e})"]
    if not values:
        return []
    v = np.concatenate(values)
    if v.size == 0:
        return []
    q = np.quantile(v, [0.5, 0.9, 0.99])
    what = codec.position_label
    return [f"  {what:<10} over {v.size} positions of {n} samples: mean {v.mean():.4g}, median {q[0]:.4g}, "
            f"p90 {q[1]:.4g}, p99 {q[2]:.4g}, max {v.max():.4g}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inspect_shards.py", description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path, nargs="?", default=None, help="a target folder (<run>/round_<r>/targets)")
    parser.add_argument("--verify", action="store_true", help="check every shard's size and sha256")
    parser.add_argument("--samples", type=int, default=256, help="samples read for the statistics (0: none)")
    parser.add_argument("--sizes", action="store_true", help="bytes per stored position of each codec and K")
    parser.add_argument("--config", default=None, help="with --sizes: YAML config (its model.vocab_size is used)")
    parser.add_argument("--k", type=int, nargs="*", default=[1, 4, 8, 12, 16, 32, 64, 128], help="with --sizes")
    parser.add_argument("overrides", nargs="*", help="with --sizes: key=value config overrides")
    args = parser.parse_args(argv)
    if args.dir is not None and "=" in args.dir.name:  # an override, not a folder
        args.overrides.insert(0, str(args.dir))
        args.dir = None
    if args.sizes:
        try:
            cfg = load_config(args.config, args.overrides)
        except BadInput as e:
            print(f"inspect_shards: error: {e}", file=sys.stderr)
            return 2
        for vocab in (cfg.model.vocab_size, GPT2_VOCAB):
            print("\n".join(size_table(vocab, args.k)))
        if args.dir is None:
            return 0
    if args.dir is None:
        parser.error("a target folder is required (or --sizes)")
    if args.verify:
        bad = shards.verify(args.dir)
        for b in bad:
            print(f"BAD {b.name}: {b.reason}")
        if bad:
            print(f"verify: {len(bad)} bad shard(s) in {args.dir}", file=sys.stderr)
            return 1
    try:
        manifest = shards.read_manifest(args.dir)
        print("\n".join(shards.summarize(args.dir)))
    except shards.ShardError as e:
        print(f"inspect_shards: error: {e}", file=sys.stderr)
        return 2
    if args.samples > 0:
        lines = sample_stats(args.dir, manifest, args.samples)
        if lines:
            print("\n".join(lines))
    if args.verify:
        print(f"verify: all {len(manifest['shards'])} shards match the manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
