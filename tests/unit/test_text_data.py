"""Text data at scale (trainer/data/corpus.py, packing.py): every local format reads the same documents,
the rows do not depend on the number of tokeniser processes, MDLM's wrapping, uint16 storage, the
stream stops reading when capped. (An unreachable hub dataset: tests/jobs/test_prepare_text.py.)"""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from trainer.config import DataConfig
from trainer.data.corpus import expand_paths, iter_text_documents
from trainer.data.errors import DataError
from trainer.data.packing import Packer, encode_docs, pack_stream, token_dtype
from trainer.data.prepared import load_data_info, load_split, prepare_data
from trainer.data.tokenizers import ByteTokenizer

DOCS = [f"document {i}: " + "lorem ipsum " * (i % 5) + "é" * (i % 3) for i in range(50)]


def _write_all_formats(root):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    (root / "c.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    table = pa.table({"id": list(range(len(DOCS))), "text": DOCS})
    pq.write_table(table, root / "c.parquet", row_group_size=7)
    with pa.OSFile(str(root / "file.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table, max_chunksize=9)
    ds = datasets.Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))})
    ds.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(3))}).save_to_disk(str(root / "dict"))
    (root / "one.txt").write_text(DOCS[0])
    return root


def test_every_local_format_reads_the_same_documents(tmp_path):
    root = _write_all_formats(tmp_path / "c")
    for name in ("c.jsonl", "c.parquet", "file.arrow", "saved", "dict", "saved/*.arrow"):
        files = expand_paths([str(root / name)])
        assert list(iter_text_documents(files, "text")) == DOCS, name
    assert list(iter_text_documents([root / "dict"], "text", split="validation")) == DOCS[:3]
    assert list(iter_text_documents(expand_paths([str(root / "*.txt")]), "text")) == [DOCS[0]]
    for name in ("c.parquet", "file.arrow", "saved"):
        with pytest.raises(DataError, match=rf"{name.split('.')[0]}.*no column 'body'.*columns: "):
            list(iter_text_documents([root / name], "body"))
    with pytest.raises(DataError, match="split 'test'"):
        list(iter_text_documents([root / "dict"], "text", split="test"))
    (root / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable parquet file"):
        list(iter_text_documents([root / "bad.parquet"], "text"))


def test_rows_do_not_depend_on_the_number_of_workers(tmp_path):
    root = _write_all_formats(tmp_path / "c")
    digests = []
    for workers in (1, 2):
        cfg = DataConfig(source="text", paths=[str(root / "c.parquet")], seq_len=16, num_train_sequences=0,
                         num_valid_sequences=4, workers=workers)
        info = load_data_info(prepare_data(cfg, tmp_path / f"w{workers}"))
        assert info["workers"] == workers and info["dtype"] == "uint16" and info["pack_seconds"] > 0
        assert info["text_bytes"] == sum(len(d.encode()) for d in DOCS)
        digests.append(info["digest"])
    assert digests[0] == digests[1]


def test_wrapped_rows_are_mdlms(tmp_path):
    tok = ByteTokenizer()
    cfg = DataConfig(source="text", paths=[str(_write_all_formats(tmp_path / "c") / "c.jsonl")], seq_len=12,
                     num_train_sequences=0, num_valid_sequences=2, wrap=True, workers=1)
    out = prepare_data(cfg, tmp_path / "d")
    rows = np.concatenate([load_split(out, "train"), load_split(out, "valid")])
    assert (rows[:, 0] == tok.eos_id).all() and (rows[:, -1] == tok.eos_id).all()  # byte BOS = EOS
    stream = np.concatenate([[tok.eos_id, *tok.encode(d), tok.eos_id] for d in DOCS])
    n = stream.size // 10
    expected = stream[:n * 10].reshape(n, 10)
    assert sorted(map(tuple, rows[:, 1:-1].tolist())) == sorted(map(tuple, expected.tolist()))
    info = load_data_info(out)
    assert info["wrap"] is True and info["bos_id"] == tok.eos_id
    # The wrap is an input: the same folder refuses unwrapped data.
    with pytest.raises(DataError, match="changed: wrap"):
        prepare_data(DataConfig(**{**cfg.__dict__, "wrap": False}), tmp_path / "d")


def test_packer_and_dtype():
    assert token_dtype(50258) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32
    p = Packer(4, eos=9, bos=8, wrap=True, dtype=np.uint16)
    assert p.add(np.array([1, 2, 3], dtype=np.int32)).shape == (1, 4)
    np.testing.assert_array_equal(p.add(np.array([4, 5], dtype=np.int32)), [[8, 3, 4, 9]])
    assert p.carry.tolist() == [5]
    with pytest.raises(ValueError, match="seq_len=2"):
        Packer(2, 0, 0, wrap=True)
    assert encode_docs(ByteTokenizer(), ["a", "b"], wrap=True).tolist() == [256, 97, 256, 256, 98, 256]


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


def test_auto_workers_follow_the_input_size(tmp_path):
    from trainer.data.prepared import auto_workers

    (tmp_path / "small.txt").write_text("tiny")
    assert auto_workers(DataConfig(source="text", paths=[str(tmp_path / "small.txt")])) == 1


def test_wrapping_uses_the_tokenizers_bos(tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    from trainer.data.packing import bos_id
    from trainer.data.tokenizers import HFTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(DOCS, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>", "<s>"])
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>", "bos_token": "<s>"}')
    tok = HFTokenizer(tmp_path)
    assert (tok.eos_id, tok.bos_id, bos_id(tok)) == (0, 1, 1)
    assert encode_docs(tok, ["ab"], wrap=True).tolist()[::len(tok.encode("ab")) + 1] == [1, 0]
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    assert bos_id(HFTokenizer(tmp_path)) == 0  # no BOS named: EOS, as GPT-2
