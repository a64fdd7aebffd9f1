"""Prepare token data once for a run: ``python -m trainer.jobs.prepare --run-dir DIR [--config FILE]
[key=value ...]``.

Writes ``train.npy``/``valid.npy`` (and ``test.npy``)/``data.json`` under ``data.cache_dir`` (default ``DIR/data``) and
prints a summary. Running it again with the same inputs does nothing; with different inputs for the
same folder it refuses (trainer/data/prepared.py says why).
"""
from __future__ import annotations

from pathlib import Path

from trainer.config import ConfigError
from trainer.data.prepared import data_dir, load_data_info, prepare_data
from trainer.jobs import common


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args("Prepare token data once for a run.", argv=argv)
    # The run folder's config.yaml when it has one (the pipeline's resolved config), and the
    # first stage of a new run writes it.
    cfg = common.run_config(args, write=True)
    out = prepare_data(cfg.data, data_dir(cfg.data, args.run_dir), progress=True)
    info = load_data_info(out)
    if info["vocab_size"] > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's "
                          f"vocabulary {info['vocab_size']} (tokenizer {info['tokenizer']})")
    print(summary(out, info))
    return 0


def summary(out: Path, info: dict) -> str:
    lines = [f"data: {out}",
             f"  source     {info['source']}",
             f"  tokenizer  {info['tokenizer']} (vocab {info['vocab_size']})",
             f"  sequences  train {info['num_train']}, valid {info['num_valid']}"
             + (f", test {info['num_test']}" if info.get("num_test") else "") + f", length {info['seq_len']}",
             f"  stored     {info.get('dtype', 'int32')}" + (", rows [BOS] ... [EOS]" if info.get("wrap") else ""),
             f"  digest     {info['digest']}"]
    if "num_docs" in info:
        held = (f"train {info['train_docs']:,}, valid {info['valid_docs']:,}"
                + (f", test {info['test_docs']:,}" if "test_docs" in info else "") + " (the last ones held out)"
                if "train_docs" in info else "validation rows drawn from the whole corpus (no holdout)")
        lines.append(f"  documents  {info['num_docs']:,}: {held}")
    if "mb_per_s" in info:
        lines.append(f"  packed     {info['text_bytes'] / 1e6:.1f} MB of text into {info['tokens']} tokens in "
                     f"{info['pack_seconds']:.1f} s: {info['mb_per_s']:.2f} MB/s with {info['workers']} worker(s)")
    if "entropy_rate" in info:
        lines.append(f"  entropy    rate {info['entropy_rate']:.4f} nats/token; a true sample of length "
                     f"{info['seq_len']}: {info['sequence_entropy_per_token']:.4f} nats/token")
    return "\n".join(lines)


if __name__ == "__main__":
    common.entry(main)
