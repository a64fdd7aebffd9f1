"""trainer/data/prepared.py, trainer/data/tokenizers.py (byte) and trainer/jobs/prepare.py."""
from __future__ import annotations

import itertools
import json
import sys
import types

import numpy as np
import pytest
import torch

from trainer.config import DataConfig, SyntheticConfig
from trainer.data.packing import pack_stream
from trainer.data.prepared import (
    DataError,
    MarkovSource,
    batches,
    data_digest,
    expand_paths,
    iter_hf_documents,
    iter_text_documents,
    load_data_info,
    load_split,
    prepare_data,
    split_indices,
)
from trainer.data.stream import PretrainBatches
from trainer.data.synthetic import _period
from trainer.data.tokenizers import ByteTokenizer, TokenizerError, load_tokenizer
from trainer.jobs import prepare as prepare_job
from trainer.jobs.common import entry


# --------------------------------------------------------------------------------------------------
# Markov source
# --------------------------------------------------------------------------------------------------
def _all_sequences(vocab: int, length: int) -> np.ndarray:
    return np.array(list(itertools.product(range(vocab), repeat=length)))


@pytest.mark.parametrize("branching", [1, 2, 3])
@pytest.mark.parametrize("leak", [0.0, 0.05])
def test_likelihood_and_entropy_match_brute_force(branching, leak):
    src = MarkovSource(SyntheticConfig(vocab_size=3, branching=branching, concentration=0.6, leak=leak, seed=7))
    seqs = _all_sequences(3, 4)
    logp = src.log_prob(seqs)
    p = np.exp(logp)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    brute_entropy = -(p[p > 0] * logp[p > 0]).sum() / 4
    assert src.sequence_entropy_per_token(4) == pytest.approx(brute_entropy, abs=1e-12)
    np.testing.assert_allclose(src.nll_per_token(seqs), -logp / 4)
    # Stationary law: a fixed point of P; the bigram law is a joint with pi as both marginals.
    pi, joint = src.stationary, src.bigram_distribution()
    np.testing.assert_allclose(pi @ src.transition_matrix(), pi, atol=1e-14)
    np.testing.assert_allclose(joint.sum(axis=1), pi, atol=1e-14)
    np.testing.assert_allclose(joint.sum(axis=0), pi, atol=1e-14)
    # Entropy rate = H(x1 | x0) computed from the joint.
    cond = joint / pi[:, None]
    on = joint > 0
    assert src.entropy_rate == pytest.approx(-(joint[on] * np.log(cond[on])).sum(), abs=1e-12)


def test_chain_is_irreducible_and_aperiodic():
    for seed in range(30):
        src = MarkovSource(SyntheticConfig(vocab_size=5, branching=2, leak=0.0, seed=seed))
        assert all(len(set(row)) == 2 for row in src.succ.tolist())  # distinct successors
        # Primitive matrix (irreducible + aperiodic) <=> P^k > 0 for k = (V - 1)^2 + 1 (Wielandt).
        p = src.transition_matrix()
        assert (np.linalg.matrix_power(p, 17) > 0).all(), seed
        assert _period(src.succ) == 1
    cycle = MarkovSource(SyntheticConfig(vocab_size=6, branching=1, leak=0.0, seed=0))
    np.testing.assert_allclose(cycle.stationary, np.full(6, 1 / 6))
    assert cycle.entropy_rate == 0.0


def test_sparse_and_dense_stationary_agree():
    src = MarkovSource(SyntheticConfig(vocab_size=64, seed=3))
    np.testing.assert_allclose(src._stationary_power(), src.stationary, atol=1e-12)


def test_large_vocabulary_stays_sparse():
    src = MarkovSource(SyntheticConfig(vocab_size=50257, seed=0))
    assert src.stationary.sum() == pytest.approx(1.0)
    x = src.sample(4, 16, np.random.default_rng(0))
    assert np.isfinite(src.log_prob(x)).all()
    with pytest.raises(DataError, match="too large"):
        src.bigram_distribution()


def test_sample_nll_approaches_sequence_entropy():
    src = MarkovSource(SyntheticConfig())  # the tiny config's chain
    x = src.sample(4000, 64, np.random.default_rng(0))
    assert x.dtype == np.int64 and x.shape == (4000, 64)
    assert x.min() >= 0 and x.max() < 64
    nll = src.nll_per_token(x)
    se = nll.std(ddof=1) / np.sqrt(nll.size)
    assert abs(nll.mean() - src.sequence_entropy_per_token(64)) < 4 * se
    # First tokens follow the stationary law.
    freq = np.bincount(x[:, 0], minlength=64) / x.shape[0]
    assert np.abs(freq - src.stationary).sum() < 0.15


def test_sparse_chain_gives_minus_inf_for_an_impossible_transition():
    src = MarkovSource(SyntheticConfig(vocab_size=8, branching=2, leak=0.0, seed=0))
    missing = next(j for j in range(8) if j not in src.succ[0])
    assert src.log_prob(np.array([[0, missing]]))[0] == -np.inf
    with pytest.raises(DataError, match="MASK"):
        src.log_prob(np.array([[0, 8]]))


# --------------------------------------------------------------------------------------------------
# Tokenizers and packing
# --------------------------------------------------------------------------------------------------
def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "byte")
    ids = tok.encode("héllo")
    assert ids == list("héllo".encode())
    assert tok.decode(ids + [256] + tok.encode("x")) == "héllo<|endoftext|>x"
    with pytest.raises(TokenizerError, match="/nonexistent/tok"):
        load_tokenizer("/nonexistent/tok")


def test_packing_appends_eos_and_drops_the_remainder():
    tok = ByteTokenizer()
    rows = np.concatenate(list(pack_stream(["ab", "cde"], "byte", tok, seq_len=3)))
    a, b, c, d, e = (ord(ch) for ch in "abcde")
    np.testing.assert_array_equal(rows, [[a, b, 256], [c, d, e]])  # the final EOS is the remainder
    assert rows.dtype == np.int32
    capped = np.concatenate(list(pack_stream(["abcdefgh"] * 10, "byte", tok, seq_len=2, max_rows=3)))
    assert capped.shape == (3, 2)


def test_text_globs_txt_and_jsonl(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.txt").write_text("first doc")
    (tmp_path / "a" / "2.txt").write_text("second\ndoc")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third", "id": 1}) + "\n\n"
                                      + json.dumps({"text": "fourth"}) + "\n")
    files = expand_paths([str(tmp_path / "a" / "*.txt"), str(tmp_path / "*.jsonl")])
    assert [f.name for f in files] == ["1.txt", "2.txt", "b.jsonl"]
    assert list(iter_text_documents(files, "text")) == ["first doc", "second\ndoc", "third", "fourth"]
    with pytest.raises(DataError, match="matches no file"):
        expand_paths([str(tmp_path / "nothing*.txt")])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no field 'text'"):
        list(iter_text_documents([tmp_path / "bad.jsonl"], "text"))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:1: invalid JSON"):
        list(iter_text_documents([tmp_path / "broken.jsonl"], "text"))
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(DataError, match=r"c\.csv: unsupported file type"):
        expand_paths([str(tmp_path / "c.csv")])


def test_split_is_deterministic_and_disjoint():
    train, valid = split_indices(100, 10, 0, seed=3)
    assert valid.size == 10 and train.size == 90
    assert sorted(np.concatenate([train, valid]).tolist()) == list(range(100))
    train2, valid2 = split_indices(100, 10, 0, seed=3)
    np.testing.assert_array_equal(valid, valid2)
    assert not np.array_equal(valid, split_indices(100, 10, 0, seed=4)[1])
    assert split_indices(100, 10, 25, seed=3)[0].size == 25
    with pytest.raises(DataError, match="num_valid_sequences"):
        split_indices(10, 10, 0, seed=0)


# --------------------------------------------------------------------------------------------------
# Prepared data
# --------------------------------------------------------------------------------------------------
def _synthetic_cfg(**kw) -> DataConfig:
    return DataConfig(source="synthetic", seq_len=16, num_train_sequences=300, num_valid_sequences=40, **kw)


def test_prepare_synthetic_is_deterministic_and_idempotent(tmp_path):
    cfg = _synthetic_cfg()
    out = prepare_data(cfg, tmp_path / "one")
    info = load_data_info(out)
    train, valid = load_split(out, "train"), load_split(out, "valid")
    assert train.shape == (300, 16) and valid.shape == (40, 16) and train.dtype == np.uint16  # V = 64 fits
    assert isinstance(train, np.memmap)
    assert info["vocab_size"] == 64 and info["tokenizer"] == "synthetic"
    assert info["sequence_entropy_per_token"] == pytest.approx(
        MarkovSource(cfg.synthetic).sequence_entropy_per_token(16))
    assert data_digest(out) == info["digest"]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    prepare_data(cfg, out)  # same inputs: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert sorted(stamps) == ["data.json", "train.npy", "valid.npy"]  # no temporaries left
    # Same inputs elsewhere: same bytes. Another data.seed: other draws, same chain.
    assert data_digest(prepare_data(cfg, tmp_path / "two")) == info["digest"]
    other = prepare_data(_synthetic_cfg(seed=1), tmp_path / "three")
    assert data_digest(other) != info["digest"]
    # Train and valid are independent streams (no shared prefix of draws).
    assert not np.array_equal(train[:40], valid)
    # Different inputs into the same folder: refused, naming what changed.
    with pytest.raises(DataError, match="seq_len"):
        prepare_data(DataConfig(seq_len=32, num_train_sequences=300, num_valid_sequences=40), out)


def test_prepare_text(tmp_path):
    docs = [f"document number {i} " + "x" * (i % 7) for i in range(60)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(source="text", paths=[str(tmp_path / "*.jsonl")], seq_len=8, num_train_sequences=0,
                     num_valid_sequences=20, seed=5)
    out = prepare_data(cfg, tmp_path / "data")
    info = load_data_info(out)
    tok = ByteTokenizer()
    flat = np.concatenate([tok.encode(d) + [tok.eos_id] for d in docs])
    expected_rows = flat[: flat.size // 8 * 8].reshape(-1, 8)
    assert info["num_packed"] == expected_rows.shape[0]
    assert info["num_valid"] == 20 and info["num_train"] == expected_rows.shape[0] - 20
    assert info["tokenizer"] == "byte" and info["eos_id"] == 256
    both = np.concatenate([load_split(out, "train"), load_split(out, "valid")])
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, expected_rows.tolist()))
    # Capped: packing stops early and the cap holds.
    capped = prepare_data(DataConfig(source="text", paths=cfg.paths, seq_len=8, num_train_sequences=15,
                                     num_valid_sequences=5), tmp_path / "capped")
    assert load_split(capped, "train").shape == (15, 8)


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(DataError, match=r"data\.json not found"):
        load_split(tmp_path, "train")
    out = prepare_data(_synthetic_cfg(), tmp_path / "d")
    with pytest.raises(DataError, match="no split 'test'"):
        load_split(out, "test")
    (out / "valid.npy").write_bytes((out / "valid.npy").read_bytes()[:200])
    with pytest.raises(DataError, match=r"valid\.npy"):
        load_split(out, "valid")
    (out / "train.npy").unlink()
    with pytest.raises(DataError, match=r"train\.npy not found"):
        load_split(out, "train")
    (out / "data.json").write_text("{oops")
    with pytest.raises(DataError, match=r"data\.json: corrupt"):
        load_data_info(out)


def test_hf_source_without_datasets_or_cache(monkeypatch):
    cfg = DataConfig(source="hf", hf_name="some/corpus")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match="'hf' extra"):
        list(iter_hf_documents(cfg))

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    fake = types.SimpleNamespace(load_dataset=offline)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match=r"'some/corpus'.*ConnectionError.*local Hugging Face cache"):
        list(iter_hf_documents(cfg))


def test_hf_source_reads_the_text_field(monkeypatch):
    rows = [{"text": "one"}, {"text": "two"}, {"text": "three"}]

    class FakeDataset:
        column_names = ["text"]

        def iter(self, batch_size):
            for i in range(0, len(rows), batch_size):
                yield {"text": [r["text"] for r in rows[i:i + batch_size]]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: FakeDataset()))
    assert list(iter_hf_documents(DataConfig(source="hf", hf_name="x"))) == ["one", "two", "three"]
    with pytest.raises(DataError, match="no column 'body'"):
        list(iter_hf_documents(DataConfig(source="hf", hf_name="x", text_field="body")))


# --------------------------------------------------------------------------------------------------
# Training batches
# --------------------------------------------------------------------------------------------------
def test_batches_are_disjoint_per_rank_and_resume_exactly():
    tokens = np.arange(37 * 3, dtype=np.int32).reshape(37, 3)  # row r starts with 3r
    world, global_batch, steps = 2, 8, 14  # 4 steps per epoch: covers 3 epoch boundaries

    def run(rank, start):
        stream = batches(tokens, global_batch, rank, world, seed=11, start_step=start)
        return [next(stream) for _ in range(steps - start)]

    full = {r: run(r, 0) for r in range(world)}
    for r in range(world):
        resumed = run(r, 6)
        assert [s for s, _ in resumed] == list(range(6, steps))
        for (s1, b1), (s2, b2) in zip(full[r][6:], resumed):
            assert s1 == s2 and b1.dtype == b2.dtype and bool((b1 == b2).all())
    for k in range(steps):
        parts = [full[r][k][1] for r in range(world)]
        assert all(p.shape == (4, 3) for p in parts)
        rows = [int(v) // 3 for p in parts for v in p[:, 0]]
        assert len(set(rows)) == global_batch  # ranks are disjoint
    # Within an epoch no row repeats; epochs are shuffled differently.
    epoch0 = [int(v) // 3 for k in range(4) for r in range(world) for v in full[r][k][1][:, 0]]
    epoch1 = [int(v) // 3 for k in range(4, 8) for r in range(world) for v in full[r][k][1][:, 0]]
    assert len(set(epoch0)) == 32 and epoch0 != epoch1
    with pytest.raises(ValueError, match="multiple of the world"):
        next(batches(tokens, 7, 0, 2, seed=0))
    with pytest.raises(DataError, match="fewer than one global batch"):
        next(batches(tokens[:5], 8, 0, 2, seed=0))


def test_pretrain_source_reads_data_position_offset_plus_step():
    """PretrainBatches: step k is the stream's step offset + k (this rank's part, in micro-batches), in
    order, after a restart at any step (a resume) and after a jump back; the checkpoint state is the step."""
    tokens = np.arange(37 * 3, dtype=np.int32).reshape(37, 3)
    world, global_batch, micro, offset = 2, 8, 2, 5
    expected = [b for _, b in itertools.islice(batches(tokens, global_batch, 1, world, seed=11), 20)]

    def check(source, step):
        parts = source.batches(step)
        assert [p.shape for p in parts] == [(micro, 3), (micro, 3)]
        assert bool((torch.cat(parts) == expected[offset + step]).all())

    source = PretrainBatches(tokens, global_batch, 1, world, seed=11, micro_batch=micro, offset=offset)
    for step in [0, 1, 2, 3, 9, 10, 4, 5]:  # in order, a restart further on, back
        check(source, step)
    check(PretrainBatches(tokens, global_batch, 1, world, seed=11, micro_batch=micro, offset=offset), 7)
    assert source.state(12) == {"data_step": 12}


# --------------------------------------------------------------------------------------------------
# The prepare job
# --------------------------------------------------------------------------------------------------
def test_prepare_job(tmp_path, capsys):
    argv = ["--run-dir", str(tmp_path / "run"), "data.num_train_sequences=200", "data.num_valid_sequences=20"]
    assert prepare_job.main(argv) == 0
    printed = capsys.readouterr().out
    assert "train 200, valid 20" in printed and "nats/token" in printed
    info = load_data_info(tmp_path / "run" / "data")
    assert prepare_job.main(argv) == 0  # idempotent
    assert load_data_info(tmp_path / "run" / "data") == info
    with pytest.raises(SystemExit) as e:  # what `python -m trainer.jobs.prepare` does with bad input
        entry(lambda: prepare_job.main(["--run-dir", str(tmp_path / "run"), "data.bogus=1"]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error (rank 0): ") and "data.bogus" in err
