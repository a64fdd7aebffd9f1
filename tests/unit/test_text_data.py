"""Text data at scale (trainer/data/corpus.py, packing.py): every local format reads the same documents,
uint16 storage, the packer. With tokeniser processes (the rows do not depend on their number, MDLM's
wrapping, the stream stops reading when capped): tests/processes/test_packing_workers.py. (An unreachable
hub dataset: tests/jobs/test_prepare_text.py.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import CORPUS_DOCS, write_corpus_formats
from trainer.config import DataConfig
from trainer.data.corpus import expand_paths, iter_text_documents
from trainer.data.errors import DataError
from trainer.data.packing import Packer, encode_docs, pack_stream, token_dtype
from trainer.data.prepared import load_data_info, load_split, prepare_data
from trainer.data.tokenizers import ByteTokenizer


def test_every_local_format_reads_the_same_documents(tmp_path):
    root = write_corpus_formats(tmp_path / "c")
    for name in ("c.jsonl", "c.parquet", "file.arrow", "saved", "dict", "saved/*.arrow"):
        files = expand_paths([str(root / name)])
        assert list(iter_text_documents(files, "text")) == CORPUS_DOCS, name
    assert list(iter_text_documents([root / "dict"], "text", split="validation")) == CORPUS_DOCS[:3]
    assert list(iter_text_documents(expand_paths([str(root / "*.txt")]), "text")) == [CORPUS_DOCS[0]]
    for name in ("c.parquet", "file.arrow", "saved"):
        with pytest.raises(DataError, match=rf"{name.split('.')[0]}.*no column 'body'.*columns: "):
            list(iter_text_documents([root / name], "body"))
    with pytest.raises(DataError, match="split 'test'"):
        list(iter_text_documents([root / "dict"], "text", split="test"))
    (root / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable parquet file"):
        list(iter_text_documents([root / "bad.parquet"], "text"))


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


def test_auto_workers_follow_the_input_size(tmp_path):
    from trainer.data.prepared import auto_workers

    (tmp_path / "small.txt").write_text("tiny")
    assert auto_workers(DataConfig(source="text", paths=[str(tmp_path / "small.txt")])) == 1


def test_wrapping_uses_the_tokenizers_bos(tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    from trainer.data.packing import bos_id
    from trainer.data.tokenizers import HFTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS_DOCS, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>", "<s>"])
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

    root = write_corpus_formats(tmp_path / "c")
    (root / "blank-lines.jsonl").write_text(json.dumps({"text": "a"}) + "\n\n  \n" + json.dumps({"text": "b"}) + "\n")
    for name in ("c.jsonl", "c.parquet", "file.arrow", "saved", "dict", "saved/*.arrow", "*.txt", "blank-lines.jsonl"):
        cfg = DataConfig(source="text", paths=[str(root / name)])
        assert count_documents(cfg) == len(list(iter_text_documents(expand_paths(cfg.paths), "text"))), name
    assert count_documents(DataConfig(source="text", paths=[str(root / "c.parquet"), str(root / "one.txt")])) == 51

    cfg = DataConfig(source="text", paths=[str(root / "c.parquet")], seq_len=8, num_train_sequences=0,
                     num_valid_sequences=4, expect_docs=len(CORPUS_DOCS) + 1)
    with pytest.raises(DataError) as e:
        prepare_data(cfg, tmp_path / "short")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.expect_docs: ")
    assert f"holds {len(CORPUS_DOCS)} documents, fewer than the {len(CORPUS_DOCS) + 1} expected" in msg
    assert "partial" in msg
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
    info = load_data_info(prepare_data(DataConfig(**{**cfg.__dict__, "expect_docs": len(CORPUS_DOCS)}),
                                       tmp_path / "ok"))
    assert info["num_docs"] == len(CORPUS_DOCS) and info["holdout"].startswith("none")


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
