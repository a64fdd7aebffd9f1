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


def test_packer_and_dtype():
    assert token_dtype(50258) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32
    p = Packer(4, eos=9, bos=8, wrap=True, dtype=np.uint16)
    assert p.add(np.array([1, 2, 3], dtype=np.int32)).shape == (1, 4)
    np.testing.assert_array_equal(p.add(np.array([4, 5], dtype=np.int32)), [[8, 3, 4, 9]])
    assert p.carry.tolist() == [5]
    with pytest.raises(ValueError, match="seq_len=2"):
        Packer(2, 0, 0, wrap=True)
    assert encode_docs(ByteTokenizer(), ["a", "b"]).tolist() == [97, 256, 98, 256]  # no BOS per document
    g = Packer(5, eos=9, bos=8, wrap=True)
    assert g.add(np.array([1, 2, 3, 4], dtype=np.int32)).tolist() == [[8, 1, 2, 3, 9]]
    g.end_group()  # the group's partial chunk [4] is dropped, as MDLM drops each group's remainder
    assert g.add(np.array([5, 6, 7], dtype=np.int32)).tolist() == [[8, 5, 6, 7, 9]]


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
    rows = list(pack_stream(["ab"] * 8, str(tmp_path), tok, seq_len=len(tok.encode("ab")) + 3, wrap=True))
    assert rows and all(r[0] == 1 and r[-1] == 0 for r in np.concatenate(rows))  # [<s>] ... [<|endoftext|>]
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    assert bos_id(HFTokenizer(tmp_path)) == 0  # no BOS named: EOS, as GPT-2


def _doc(i: int, rng: np.random.Generator) -> str:
    """A document whose words all name it (w<i>x<j>), so a row's text tells which documents it holds."""
    return " ".join(f"w{i}x{j}" for j in range(int(rng.integers(3, 40)))) + ("." if i % 3 else ".\n")


@pytest.mark.parametrize("wrap", [True, False])
def test_held_out_documents_never_reach_training_rows(tmp_path, wrap):
    """data.valid_docs / data.test_docs on a real BPE tokenizer: no training row holds any text of
    the last documents; validation rows come only from the valid part, test rows from the test part."""
    import re

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tools.train_tokenizer import train_on_documents
    from trainer.data.tokenizers import load_tokenizer

    rng = np.random.default_rng(0)
    docs = [_doc(i, rng) for i in range(400)]
    (tmp_path / "corpus").mkdir()
    for k in range(2):  # two files: the holdout is the last documents of the whole corpus, in glob order
        pq.write_table(pa.table({"text": docs[k * 200:(k + 1) * 200]}), tmp_path / "corpus" / f"part-{k}.parquet")
    tok_dir = train_on_documents(docs, tmp_path / "tok", 400)
    tok = load_tokenizer(str(tok_dir))
    cfg = DataConfig(source="text", paths=[str(tmp_path / "corpus" / "*.parquet")], tokenizer=str(tok_dir),
                     seq_len=24, wrap=wrap, num_train_sequences=0, num_valid_sequences=20, valid_docs=60,
                     test_docs=25, workers=1, seed=3)
    out = prepare_data(cfg, tmp_path / "d")

    def doc_ids(split: str) -> set[int]:
        """The documents whose words appear in some row of the split (each row decoded on its own:
        a w<i>x match inside one row is a whole word of document i)."""
        return {int(m) for row in load_split(out, split) for m in re.findall(r"w(\d+)x", tok.decode(row.tolist()))}

    train, valid, test = doc_ids("train"), doc_ids("valid"), doc_ids("test")
    assert train <= set(range(315)) and len(train) > 300  # no held-out document's text in a training row
    assert valid and valid <= set(range(315, 375))
    assert test <= set(range(375, 400)) and len(test) > 20
    info = load_data_info(out)
    assert (info["num_docs"], info["train_docs"], info["valid_docs"], info["test_docs"]) == (400, 315, 60, 25)
    assert info["num_valid"] == 20 and load_split(out, "test").shape[0] == info["num_test"] > 0
    # More validation rows than the held-out documents give, or nothing left to train on: one line.
    with pytest.raises(DataError, match=r"data\.valid_docs: the 60 held-out documents .* fewer than "
                                        r"data\.num_valid_sequences=100000"):
        prepare_data(DataConfig(**{**cfg.__dict__, "num_valid_sequences": 100000}), tmp_path / "e")
    with pytest.raises(DataError, match=r"data\.valid_docs: .* 400 documents, not more than the 400 held out"):
        prepare_data(DataConfig(**{**cfg.__dict__, "valid_docs": 375}), tmp_path / "f")


def test_documents_are_counted_and_a_short_corpus_is_refused(tmp_path, capsys):
    """data.expect_docs: prepare counts documents first (metadata for parquet/arrow/save_to_disk,
    one read for jsonl), refuses a corpus below it in one line naming the likely partial conversion,
    writes nothing; the count is recorded in data.json."""
    from trainer.data.corpus import count_documents
    from trainer.jobs import prepare as prepare_job
    from trainer.jobs.common import entry

    root = _write_all_formats(tmp_path / "c")
    (root / "blank-lines.jsonl").write_text(json.dumps({"text": "a"}) + "\n\n  \n" + json.dumps({"text": "b"}) + "\n")
    for name in ("c.jsonl", "c.parquet", "file.arrow", "saved", "dict", "saved/*.arrow", "*.txt", "blank-lines.jsonl"):
        cfg = DataConfig(source="text", paths=[str(root / name)])
        assert count_documents(cfg) == len(list(iter_text_documents(expand_paths(cfg.paths), "text"))), name
    assert count_documents(DataConfig(source="text", paths=[str(root / "c.parquet"), str(root / "one.txt")])) == 51

    cfg = DataConfig(source="text", paths=[str(root / "c.parquet")], seq_len=8, num_train_sequences=0,
                     num_valid_sequences=4, expect_docs=len(DOCS) + 1)
    with pytest.raises(DataError) as e:
        prepare_data(cfg, tmp_path / "short")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.expect_docs: ")
    assert f"holds {len(DOCS)} documents, fewer than the {len(DOCS) + 1} expected" in msg and "partial" in msg
    assert not (tmp_path / "short" / "data.json").exists() and not list((tmp_path / "short").glob("*.npy"))
    # Through the job: exit 2 and that one line.
    capsys.readouterr()  # (datasets' save_to_disk progress above)
    run = tmp_path / "run"
    argv = ["--run-dir", str(run), "data.source=text", f"data.paths=[{root / 'c.parquet'}]", "data.seq_len=8",
            "model.max_seq_len=8", "data.num_train_sequences=0", "data.num_valid_sequences=4", "model.vocab_size=257"]
    with pytest.raises(SystemExit) as exit_:
        entry(lambda: prepare_job.main(argv + ["data.expect_docs=8013769"]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "8,013,769 expected" in err[0] and "partial" in err[0]
    # Enough documents: prepared, with the count recorded.
    info = load_data_info(prepare_data(DataConfig(**{**cfg.__dict__, "expect_docs": len(DOCS)}), tmp_path / "ok"))
    assert info["num_docs"] == len(DOCS) and info["holdout"].startswith("none")


def test_holdout_keys_are_validated(tmp_path):
    from trainer.config import ConfigError, load_config

    for overrides, key in ((["data.valid_docs=-1"], "data.valid_docs"),
                           (["data.source=text", "data.paths=[x]", "data.test_docs=5"], "data.test_docs"),
                           (["data.source=text", "data.paths=[x]", "data.expect_docs=-3"], "data.expect_docs")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config("configs/tiny.yaml", overrides)
    # An OWT config switched to the synthetic source (tools/gpu_check.py does): the corpus keys are
    # ignored, as data.paths is, and the synthetic rows are the same as without them.
    cfg = load_config("configs/small.yaml", ["data.source=synthetic", "data.synthetic.vocab_size=50257",
                                             "data.seq_len=16", "data.num_train_sequences=64",
                                             "data.num_valid_sequences=8"])
    assert (cfg.data.valid_docs, cfg.data.expect_docs) == (100000, 8013769)
    plain = DataConfig(**{**cfg.data.__dict__, "valid_docs": 0, "expect_docs": 0})
    assert load_data_info(prepare_data(cfg.data, tmp_path / "a"))["digest"] == \
        load_data_info(prepare_data(plain, tmp_path / "b"))["digest"]
