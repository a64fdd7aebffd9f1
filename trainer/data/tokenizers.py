"""Tokenizers that turn documents into token ids: a byte-level one that needs no files, and a wrapper
around a Hugging Face tokenizer kept in a local directory (never downloaded).

Both expose the same small surface (``Tokenizer``): ``encode``/``encode_batch``/``decode``,
``vocab_size``, ``eos_id`` and ``name``. ``name`` is a stable id recorded with prepared data and
target shards, so a job can refuse data made with another tokenizer.
"""
from __future__ import annotations

import functools
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
    """UTF-8 bytes are ids 0..255 and EOS is 256: any text, no files, vocabulary of 257.

    EOS renders as ``<|endoftext|>`` and that text encodes back to EOS, as a Hugging Face tokenizer
    treats its special tokens: decode then encode is the identity (what retokenising relies on).
    """

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        parts = text.split(EOS_TEXT)
        out = list(parts[0].encode("utf-8"))
        for part in parts[1:]:
            out.append(self.eos_id)
            out.extend(part.encode("utf-8"))
        return out

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
        # MDLM's wrapped rows start with BOS: the config's bos_token, else EOS (GPT-2 uses one token for both).
        self.bos_id: int | None = self._find_special("bos_token")
        hashed = files + [self.dir / n for n in _CONFIG_FILES if (self.dir / n).is_file()]
        self.name: str = f"{self.dir.resolve().name}-{_hash_files(hashed)[:12]}"

    def _model_files(self) -> list[Path]:
        for names in _MODEL_FILES:
            paths = [self.dir / n for n in names]
            if all(p.is_file() for p in paths):
                return paths
        raise TokenizerError(f"{self.dir}: no tokenizer files: expected tokenizer.json, or vocab.json "
                             f"and merges.txt")

    def _find_special(self, key: str) -> int | None:
        """The id of ``key`` (eos_token, bos_token) from the tokenizer's config files, if named there."""
        for fname in _CONFIG_FILES:
            path = self.dir / fname
            if not path.is_file():
                continue
            try:
                tok = json.loads(path.read_text(encoding="utf-8")).get(key)
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise TokenizerError(f"{path}: not a JSON object: {e}") from None
            if isinstance(tok, dict):  # AddedToken serialisation: {"content": "...", ...}
                tok = tok.get("content")
            if isinstance(tok, str):
                tid = self._tok.token_to_id(tok)
                if tid is None:
                    raise TokenizerError(f"{path}: {key} '{tok}' is not in the vocabulary")
                return tid
        return None

    def _find_eos(self) -> int:
        found = self._find_special("eos_token")
        if found is not None:
            return found
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


@functools.lru_cache(maxsize=4)
def _cached(spec: str) -> Tokenizer:
    return load_tokenizer(spec)


def render_samples(data_cfg, rows) -> list[str]:
    """Sample rows (ids [n, L]) as readable lines: decoded text (newlines shown as \\n) for text
    sources, space-separated ids for the synthetic one or when an id is outside the vocabulary (an
    unfinished sample may hold MASK). For TensorBoard's sample text and samples.txt."""
    ids = [[int(i) for i in row] for row in rows]
    if data_cfg.source == "synthetic":
        return [" ".join(map(str, r)) for r in ids]
    tok = _cached(data_cfg.tokenizer)
    out = []
    for r in ids:
        if all(0 <= i < tok.vocab_size for i in r):
            out.append(tok.decode(r).replace("\\", "\\\\").replace("\n", "\\n"))
        else:
            out.append(" ".join(map(str, r)))
    return out


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` or a local directory holding a Hugging Face tokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    if not Path(spec).is_dir():
        raise TokenizerError(f"tokenizer '{spec}' is neither 'byte' nor an existing local directory "
                             f"(data.tokenizer)")
    return HFTokenizer(spec)
