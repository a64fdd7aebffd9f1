"""Train a byte-level BPE tokenizer (GPT-2's kind) on local text with the ``tokenizers`` library.

    python tools/train_tokenizer.py --out DIR --vocab-size 4096 [--text-field text] GLOB [GLOB ...]

Reads the same inputs as ``data.paths`` (trainer/data/corpus.py: plain text, jsonl, parquet, arrow,
save_to_disk folders) and writes ``DIR/tokenizer.json`` and ``DIR/tokenizer_config.json`` with
``<|endoftext|>`` as EOS (and BOS, as GPT-2), the layout ``data.tokenizer=DIR`` loads. GPT-2's own
tokenizer needs no training: point data.tokenizer at a folder holding its vocab.json + merges.txt.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.data.corpus import expand_paths, iter_text_documents  # noqa: E402
from trainer.data.errors import DataError  # noqa: E402
from trainer.data.tokenizers import EOS_TEXT  # noqa: E402


def train_tokenizer(patterns: list[str], out: Path, vocab_size: int, text_field: str = "text",
                    min_frequency: int = 2) -> Path:
    return train_on_documents(iter_text_documents(expand_paths(patterns), text_field), out, vocab_size,
                              min_frequency)


def train_on_documents(docs: Iterable[str], out: Path, vocab_size: int, min_frequency: int = 2) -> Path:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(docs, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TEXT],
                            show_progress=False)
    out.mkdir(parents=True, exist_ok=True)
    bpe.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS_TEXT, "bos_token": EOS_TEXT}) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--text-field", default="text")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("paths", nargs="+", help="globs, as data.paths")
    args = p.parse_args(argv)
    if (args.out / "tokenizer.json").exists():
        print(f"{args.out / 'tokenizer.json'} exists: keeping it (delete the folder to retrain)")
        return 0
    try:
        train_tokenizer(args.paths, args.out, args.vocab_size, args.text_field, args.min_frequency)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from trainer.data.tokenizers import HFTokenizer

    tok = HFTokenizer(args.out)
    print(f"wrote {args.out}: byte-level BPE, vocabulary {tok.vocab_size}, EOS id {tok.eos_id} ({tok.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
