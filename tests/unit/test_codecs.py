"""trainer/method/codecs/: each code against the dense distribution it stands for, and the registry
that holds one object per codec name of trainer.config.Codec."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.config import PAIRS, Codec, choice_names
from trainer.method import codecs as C
from trainer.method import divergences


def _log_probs(m=5, vocab=16, seed=0, scale=2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(m, vocab, generator=g), dim=-1)


def test_dense_round_trip_is_exact():
    lp = _log_probs()
    fields = C.encode(lp, "dense", 0)
    assert set(fields) == {"logp"} and fields["logp"].dtype == np.float32
    assert torch.equal(C.decode(fields, "dense", 16, 0).to_dense(), lp)


def test_topk_with_k_equal_v_reproduces_the_dense_targets():
    lp = _log_probs(vocab=16)
    fields = C.encode(lp, "topk", 16)
    assert fields["logp"].dtype == np.float16 and fields["ids"].dtype == np.uint16
    assert np.all(np.isneginf(fields["logtail"]))  # nothing outside the stored ids
    dense = C.decode(fields, "topk", 16, 16).to_dense()
    # exact up to the storage dtype: the fp16 rounding of every log-prob, nothing else
    assert torch.equal(dense, lp.half().float())


def test_topk_keeps_the_largest_and_an_accurate_tail():
    lp = _log_probs(m=7, vocab=32, scale=4.0)
    k = 5
    fields = C.encode(lp, "topk", k)
    t = C.decode(fields, "topk", 32, k)
    ref = lp.double().sort(dim=-1, descending=True)
    assert torch.equal(t.ids, ref.indices[:, :k])
    tail = ref.values[:, k:].exp().sum(-1)
    assert torch.allclose(t.logtail.double().exp(), tail, rtol=1e-6)
    dense = t.to_dense().double().exp()
    assert torch.allclose(dense.sum(-1), torch.ones(7, dtype=torch.float64), atol=2e-3)  # fp16 values
    # the tail is spread uniformly over the V - K other tokens
    others = torch.ones_like(dense, dtype=torch.bool).scatter_(-1, t.ids, False)
    assert torch.allclose(dense[others].view(7, -1), (tail / (32 - k))[:, None].expand(7, 32 - k), rtol=1e-6)


def test_topk_tiny_tail_does_not_cancel():
    lp = torch.log_softmax(torch.tensor([[40.0, 0.0, 0.0, 0.0]]), dim=-1)
    fields = C.encode(lp, "topk", 1)
    expected = math.log(3) - 40.0  # log(3 e^-40 / (e^40 + 3)) to ~1e-17
    assert fields["logtail"][0] == pytest.approx(expected, abs=1e-5)  # 1 - sum would give 0 (-inf)


def test_topk_order_is_canonical_under_ties():
    lp = torch.log_softmax(torch.tensor([[0.0, 2.0, 2.0, 5.0, 2.0, -1.0]]), -1)
    assert C.encode(lp, "topk", 4)["ids"].tolist() == [[3, 1, 2, 4]]  # ties by increasing id
    uniform = torch.full((3, 10), -math.log(10))
    assert np.array_equal(C.encode(uniform, "topk", 10)["ids"], np.tile(np.arange(10), (3, 1)))


def test_sampled_code_is_consistent():
    lp = _log_probs(m=6, vocab=20)
    k = 12
    f = C.encode(lp, "sampled", k, torch.Generator().manual_seed(1))
    assert f["counts"].dtype == np.uint8 and f["nuniq"].dtype == np.uint8 and f["ids"].dtype == np.uint16
    assert f["ids"].shape == f["counts"].shape == (int(f["nuniq"].sum()),)
    t = C.decode(f, "sampled", 20, k)
    assert torch.allclose(t.weight.sum(-1), torch.ones(6))
    p_hat = t.to_dense().exp()
    assert torch.allclose(p_hat.sum(-1), torch.ones(6, dtype=p_hat.dtype))
    # reproducible from the generator alone
    g = C.encode(lp, "sampled", k, torch.Generator().manual_seed(1))
    assert all(np.array_equal(f[n], g[n]) for n in f)


def test_sampled_code_is_unbiased_and_error_shrinks_like_one_over_sqrt_n():
    lp = _log_probs(m=4, vocab=12, scale=1.5)
    p = lp.double().exp()
    k = 8
    n_small, n_big = 100, 1600
    # one encode call, one row per independent draw set: [n * M, V] -> [n, M, V]
    f = C.encode(lp.repeat(n_big, 1), "sampled", k, torch.Generator().manual_seed(0))
    est = C.decode(f, "sampled", 12, k).to_dense().double().exp().view(n_big, *p.shape)

    def rms_error(n):  # over several disjoint runs of n draws, to be stable
        runs = est[: (n_big // n) * n].view(n_big // n, n, *p.shape).mean(1)
        return (runs - p).pow(2).mean().sqrt().item()

    e_small, e_big = rms_error(n_small), rms_error(n_big)
    sd_big = (p * (1 - p) / (k * n_big)).sqrt()
    assert ((est.mean(0) - p).abs() <= 5 * sd_big + 1e-12).all()  # unbiased: within 5 sd everywhere
    ratio = e_small / e_big  # 1/sqrt(n): sqrt(16) = 4
    assert 2.5 < ratio < 6.0, ratio
    theory = (p * (1 - p) / (k * n_small)).mean().sqrt().item()
    assert e_small == pytest.approx(theory, rel=0.35)


def test_expected_distinct_matches_the_draws():
    lp = _log_probs(m=3, vocab=30, scale=2.0)
    k = 12
    gen = torch.Generator().manual_seed(3)
    seen = np.mean([C.encode(lp, "sampled", k, gen)["nuniq"].astype(float) for _ in range(400)], axis=0)
    assert np.allclose(seen, C.expected_distinct(lp.exp(), k).numpy(), rtol=0.05)


def test_no_masked_positions():
    lp = torch.zeros(0, 16)
    for codec in C.CODECS:
        f = C.encode(lp, codec, 4, torch.Generator())
        t = C.decode(f, codec, 16, 4)
        assert t.to_dense().shape == (0, 16)


def test_bytes_per_position():
    assert C.bytes_per_position("dense", 8, 64) == 256
    assert C.bytes_per_position("topk", 8, 64) == 8 * (2 + 2) + 4
    assert C.bytes_per_position("topk", 32, C.GPT2_VOCAB) == 32 * 4 + 4  # uint16 ids fit GPT-2
    assert C.bytes_per_position("topk", 32, 100_000) == 32 * 6 + 4  # int32 ids beyond 65,536
    assert C.bytes_per_position("sampled", 12, C.GPT2_VOCAB) == 12 * 3 + 1  # worst case
    assert C.bytes_per_position("sampled", 12, C.GPT2_VOCAB, distinct=4.0) == 4 * 3 + 1
    # the encoders really write that many bytes (worst case for sampled)
    lp = _log_probs(m=9, vocab=64)
    for codec, k in (("dense", 8), ("topk", 8), ("sampled", 8)):
        f = C.encode(lp, codec, k, torch.Generator().manual_seed(0))
        nbytes = sum(a.nbytes for a in f.values())
        distinct = f["nuniq"].mean() if codec == "sampled" else None
        assert nbytes == pytest.approx(9 * C.bytes_per_position(codec, k, 64, distinct))


def test_decode_names_the_problem():
    lp = _log_probs()
    f = C.encode(lp, "topk", 4)
    with pytest.raises(C.CodecError, match="missing field.*logtail"):
        C.decode({"ids": f["ids"], "logp": f["logp"]}, "topk", 16, 4)
    with pytest.raises(C.CodecError, match="K=8"):
        C.decode(f, "topk", 16, 8)
    with pytest.raises(C.CodecError, match="outside"):
        C.decode(f, "topk", 3, 4)
    s = C.encode(lp, "sampled", 4, torch.Generator())
    with pytest.raises(C.CodecError, match="nuniq"):
        C.decode({**s, "nuniq": s["nuniq"][:-1]}, "sampled", 16, 4)
    with pytest.raises(C.CodecError, match="unknown codec"):
        C.encode(lp, "zstd", 4)


def test_size_table_cli(capsys):
    from tools.inspect_shards import main

    assert main(["--sizes", "--config", "configs/tiny.yaml", "--k", "8", "32"]) == 0
    out = capsys.readouterr().out
    assert "vocabulary 64" in out and "vocabulary 50257" in out and "topk" in out and "sampled" in out
    assert main(["--sizes", "model.bogus=1"]) == 2
    assert "bad config key 'model.bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("codec,k", [("topk", 4), ("dense", 0), ("sampled", 8)])
def test_encoding_a_batch_equals_encoding_each_sample(codec, k):
    """encode_rows (one call for the batch, split by sample) gives exactly the per-sample codes,
    including a sample with no masked position; sampled uses each sample's own generator."""
    rows = [3, 0, 5, 1]
    lp = _log_probs(m=sum(rows), vocab=16, seed=3)
    gens = lambda: [torch.Generator().manual_seed(40 + b) for b in range(len(rows))]  # noqa: E731
    batch = C.encode_rows(lp, rows, codec, k, gens())
    alone = [C.encode(part, codec, k, g) for part, g in zip(lp.split(rows), gens())]
    assert len(batch) == len(rows)
    for got, want in zip(batch, alone):
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name
    with pytest.raises(C.CodecError, match="rows of log-probs"):
        C.encode_rows(lp, [1, 2], codec, k, gens()[:2])


@pytest.mark.parametrize("name", choice_names(Codec))
def test_every_declared_codec_is_one_registered_object_that_writes_exactly_its_fields(name):
    """A new codec is its module plus its name in trainer.config: the registry, the names and the
    pairing stay one set, and the object's own description (fields, positions, sizes, divergences)
    is what encode, decode and stats actually do."""
    assert list(C.REGISTRY) == list(C.CODECS) == list(choice_names(Codec)) and set(PAIRS) == set(Codec)
    codec = C.get(name)
    assert codec.name == name and codec.divergences == PAIRS[Codec(name)]
    lp, k = _log_probs(m=6, vocab=16), 4
    fields = codec.encode(lp, k, 16, torch.Generator().manual_seed(0) if codec.needs_generator else None)
    assert tuple(fields) == codec.fields
    again = C.encode(lp, name, k, torch.Generator().manual_seed(0))
    assert all(np.array_equal(fields[f], again[f]) and fields[f].dtype == again[f].dtype for f in codec.fields)
    assert np.asarray(fields[codec.positions_field]).shape[0] == 6 == C.stats(fields, name)["positions"]
    payload = sum(a.nbytes for a in fields.values())
    per_position = codec.bytes_per_position(k, 16)
    assert payload <= 6 * per_position + 1e-9  # the sizes are what is stored (sampled: at most, K distinct ids)
    targets = C.decode(fields, name, 16, k)
    assert targets.codec == name and targets.to_dense().shape == (6, 16)
    student = torch.log_softmax(torch.randn(6, 16, generator=torch.Generator().manual_seed(1)), -1)
    for kind in divergences.DIVERGENCES:
        if kind in codec.divergences:
            assert divergences.sparse_divergence(student, targets, kind).shape == (6,)
        else:
            with pytest.raises(ValueError, match=f"cannot be computed from '{name}'"):
                divergences.sparse_divergence(student, targets, kind)


def test_an_unknown_codec_is_refused_naming_the_choices():
    with pytest.raises(C.CodecError, match="unknown codec 'topp' \\(expected one of topk, topk_is, sampled, dense\\)"):
        C.get("topp")
