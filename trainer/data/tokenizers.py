"""Tokenizers that turn documents into token ids: a byte-level one that needs no files, and a wrapper
around a Hugging Face tokenizer kept in a local directory (never downloaded).

Both expose the same small surface (``Tokenizer``): ``encode``/``encode_batch``/``decode``,
``vocab_size``, ``eos_id`` and ``name``. ``name`` is a stable id recorded with prepared data and
target shards, so a job can refuse data made with another tokenizer.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from trainer.errors import BadInput

EOS_TEXT = "<|endoftext|>"  # GPT-2's end-of-text token; also how ByteTokenizer renders its EOS


class TokenizerError(BadInput, ValueError):
    """A tokenizer could not be loaded or used; the message names the path or the id."""


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255 and EOS is 256: any text, no files, vocabulary of 257."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        # Decode runs of bytes together so multi-byte characters survive; a model may emit invalid
        # UTF-8, which becomes U+FFFD rather than an exception in the middle of an evaluation.
        out: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i <= self.eos_id:
                raise TokenizerError(f"byte tokenizer: id {i} is outside [0, {self.eos_id}]")
            if i == self.eos_id:
                out.append(run.decode("utf-8", errors="replace") + EOS_TEXT)
                run = bytearray()
            else:
                run.append(i)
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


# Files that define a Hugging Face tokenizer's behaviour; hashed into its ``name``.
_MODEL_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class HFTokenizer:
    """A Hugging Face tokenizer read from ``local_dir``: ``tokenizer.json`` (any fast tokenizer) or
    GPT-2 style ``vocab.json`` + ``merges.txt`` (byte-level BPE). Uses the ``tokenizers`` library
    directly, so preparing data does not import transformers.

    The EOS token is ``eos_token`` from ``tokenizer_config.json`` / ``special_tokens_map.json`` when
    present (what ``save_pretrained`` writes), else GPT-2's ``<|endoftext|>`` if the vocabulary has it.
    """

    def __init__(self, local_dir: str | Path):
        import tokenizers  # local import: ByteTokenizer users never pay for it

        self.dir = Path(local_dir)
        if not self.dir.is_dir():
            raise TokenizerError(f"tokenizer directory not found: {self.dir}")
        files = self._model_files()
        try:
            if files[0].name == "tokenizer.json":
                self._tok = tokenizers.Tokenizer.from_file(str(files[0]))
            else:
                self._tok = tokenizers.ByteLevelBPETokenizer(str(files[0]), str(files[1]))
        except Exception as e:  # the Rust side raises plain Exceptions on malformed files
            raise TokenizerError(f"{self.dir}: cannot load tokenizer from "
                                 f"{', '.join(f.name for f in files)}: {e}") from None
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id: int = self._find_eos()
        hashed = files + [self.dir / n for n in _CONFIG_FILES if (self.dir / n).is_file()]
        self.name: str = f"{self.dir.resolve().name}-{_hash_files(hashed)[:12]}"

    def _model_files(self) -> list[Path]:
        for names in _MODEL_FILES:
            paths = [self.dir / n for n in names]
            if all(p.is_file() for p in paths):
                return paths
        raise TokenizerError(f"{self.dir}: no tokenizer files: expected tokenizer.json, or vocab.json "
                             f"and merges.txt")

    def _find_eos(self) -> int:
        for fname in _CONFIG_FILES:
            path = self.dir / fname
            if not path.is_file():
                continue
            try:
                eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise TokenizerError(f"{path}: not a JSON object: {e}") from None
            if isinstance(eos, dict):  # AddedToken serialisation: {"content": "...", ...}
                eos = eos.get("content")
            if isinstance(eos, str):
                tid = self._tok.token_to_id(eos)
                if tid is None:
                    raise TokenizerError(f"{path}: eos_token '{eos}' is not in the vocabulary")
                return tid
        tid = self._tok.token_to_id(EOS_TEXT)
        if tid is None:
            raise TokenizerError(f"{self.dir}: no eos_token in {' or '.join(_CONFIG_FILES)} and no "
                                 f"{EOS_TEXT} in the vocabulary")
        return tid

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _hash_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` or a local directory holding a Hugging Face tokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    if not Path(spec).is_dir():
        raise TokenizerError(f"tokenizer '{spec}' is neither 'byte' nor an existing local directory "
                             f"(data.tokenizer)")
    return HFTokenizer(spec)
