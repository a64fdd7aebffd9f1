"""Text packing with its tokeniser processes (trainer/data/packing.py, prepared.py): the rows do not
depend on the number of processes, MDLM's wrapping row by row with 1 or 2, the stream stops reading
when capped while processes read ahead (the rest of the text data: tests/unit/test_text_data.py)."""
from __future__ import annotations

import itertools
import json

import pytest

from tests.helpers import CORPUS_DOCS, write_corpus_formats
from trainer.config import DataConfig
from trainer.data.errors import DataError
from trainer.data.packing import pack_stream
from trainer.data.prepared import load_data_info, load_split, prepare_data
from trainer.data.tokenizers import ByteTokenizer


def test_rows_do_not_depend_on_the_number_of_workers(tmp_path):
    root = write_corpus_formats(tmp_path / "c")
    digests = []
    for workers in (1, 2):
        cfg = DataConfig(source="text", paths=[str(root / "c.parquet")], seq_len=16, num_train_sequences=0,
                         num_valid_sequences=4, workers=workers)
        info = load_data_info(prepare_data(cfg, tmp_path / f"w{workers}"))
        assert info["workers"] == workers and info["dtype"] == "uint16" and info["pack_seconds"] > 0
        assert info["text_bytes"] == sum(len(d.encode()) for d in CORPUS_DOCS)
        digests.append(info["digest"])
    assert digests[0] == digests[1]


def mdlm_wrapped_rows(token_docs: list[list[int]], seq_len: int, bos: int, eos: int) -> list[list[int]]:
    """MDLM's wrapped rows, stated from its code (kuleshov-group/mdlm dataloader.py; SDTT's
    legacy_dataloader.py is the same file): each document's ids + [EOS] (:427-428, no BOS);
    ``datasets.map(batched=True)`` hands ``_group_texts`` 1000 documents at a time (:469-482, the
    default batch_size); each group is concatenated, cut to a multiple of L - 2 (the remainder
    dropped) and every chunk becomes [BOS] chunk [EOS] (:277-300)."""
    rows = []
    for g in range(0, len(token_docs), 1000):
        stream = [t for doc in token_docs[g:g + 1000] for t in doc + [eos]]
        usable = len(stream) // (seq_len - 2) * (seq_len - 2)
        rows += [[bos] + stream[i:i + seq_len - 2] + [eos] for i in range(0, usable, seq_len - 2)]
    return rows


def test_wrapped_rows_are_mdlms_token_for_token(tmp_path):
    """Documents of known lengths, across two of MDLM's 1000-document groups in training and one
    more in the held-out part: our rows equal MDLM's grouping, row by row, with 1 or 2 workers."""
    lengths = [(7 * i) % 23 + 1 for i in range(2600)]
    docs = [chr(ord("a") + i % 26) * n for i, n in enumerate(lengths)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = ByteTokenizer()
    ids = [tok.encode(d) for d in docs]
    assert [len(x) for x in ids] == lengths
    L, held = 16, 600
    train_rows = mdlm_wrapped_rows(ids[:-held], L, bos=tok.eos_id, eos=tok.eos_id)  # byte BOS = EOS, as GPT-2
    valid_rows = mdlm_wrapped_rows(ids[-held:], L, bos=tok.eos_id, eos=tok.eos_id)
    # The group boundary matters: one stream over the training documents would give other rows.
    one_stream = mdlm_wrapped_rows([[t for d in ids[:-held] for t in d + [256]][:-1]], L, 256, 256)
    assert one_stream[:10] == train_rows[:10] and one_stream != train_rows
    digests = set()
    for workers in (1, 2):
        cfg = DataConfig(source="text", paths=[str(tmp_path / "c.jsonl")], seq_len=L, wrap=True, workers=workers,
                         num_train_sequences=0, valid_docs=held, num_valid_sequences=len(valid_rows))
        out = prepare_data(cfg, tmp_path / f"w{workers}")
        assert load_split(out, "train").tolist() == train_rows
        assert load_split(out, "valid").tolist() == valid_rows  # every held-out row, in order
        info = load_data_info(out)
        assert info["wrap"] is True and info["bos_id"] == tok.eos_id and info["num_docs"] == len(docs)
        assert (info["train_docs"], info["valid_docs"]) == (len(docs) - held, held)
        digests.add(info["digest"])
    assert len(digests) == 1
    # The wrap is an input: the same folder refuses unwrapped data.
    with pytest.raises(DataError, match="changed: wrap"):
        prepare_data(DataConfig(**{**cfg.__dict__, "wrap": False}), tmp_path / "w2")


def test_capped_packing_stops_reading(tmp_path):
    """Bounded: with a cap, the document stream is read only a bounded distance past what the cap
    needs, even with worker processes reading ahead (2 x workers batches in flight)."""
    read = itertools.count()

    def endless():
        while True:
            next(read)
            yield "x" * 100  # 101 tokens with EOS

    rows = list(pack_stream(endless(), "byte", ByteTokenizer(), 101, workers=2, max_rows=300))
    assert sum(r.shape[0] for r in rows) == 300
    assert next(read) <= 300 + 5 * 256  # the cap's documents + the in-flight window (+ one batch)
