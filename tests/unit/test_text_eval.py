"""trainer/evaluation/text.py: the field's text protocol, checked against direct computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.config import ModelConfig, load_config
from trainer.data.tokenizers import ByteTokenizer
from trainer.evaluation import text as T
from trainer.evaluation.quality import JudgeError
from trainer.model.dit import DiT

EOS = ByteTokenizer.eos_id


def _random(model: DiT, seed: int = 0, scale: float = 0.2) -> DiT:
    g = torch.Generator().manual_seed(seed)
    model.load_state_dict({k: scale * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()})
    return model.eval()


@pytest.fixture(scope="module")
def judge() -> T.OwnARTextJudge:
    cfg = ModelConfig(vocab_size=257, n_layers=2, d_model=32, n_heads=4, cond_dim=16, max_seq_len=64)
    return T.OwnARTextJudge(_random(DiT(cfg, causal=True)), ByteTokenizer())


def test_cut_at_eos():
    assert T.cut_at_eos([EOS, EOS, 1, 2, EOS, 3, EOS], EOS) == [1, 2, EOS]
    assert T.cut_at_eos([1, 2, 3], EOS) == [1, 2, 3]
    assert T.cut_at_eos([EOS, EOS], EOS) == []


def _direct_nll(judge: T.OwnARTextJudge, ids: list[int]) -> float:
    """One sequence alone (no batch, no padding): BOS, then -sum log p(token | before)."""
    x = torch.tensor([[judge.vocab_size, *ids]])
    with torch.no_grad():
        logp = torch.log_softmax(judge.model(x)[0, :-1, :judge.vocab_size].double(), -1)
    return float(-logp[torch.arange(len(ids)), torch.tensor(ids)].sum())


def test_gen_ppl_scores_up_to_the_first_eos(judge):
    texts = ["hello world<|endoftext|>ignored tail", "ab", "a much longer sample than the others"]
    got = T.gen_ppl_text(judge, texts, batch_size=2)  # padding inside batches
    tok = ByteTokenizer()
    seqs = [[*tok.encode("hello world"), EOS], tok.encode(texts[1]), tok.encode(texts[2])]
    nll = sum(_direct_nll(judge, s) for s in seqs)
    n = sum(len(s) for s in seqs)
    assert got["judge_tokens"] == n
    assert got["gen_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)  # float32 forwards, batched or not
    # What follows the first EOS changes nothing.
    other = T.gen_ppl_text(judge, ["hello world<|endoftext|>something else entirely", *texts[1:]])
    assert other["gen_ppl"] == pytest.approx(got["gen_ppl"], rel=1e-5)


def test_retokenise_truncates_to_the_judge_context(judge):
    (ids,) = T.retokenise(["x" * 500], judge)
    assert len(ids) == judge.max_tokens == 63


def test_decode_refuses_a_left_mask():
    with pytest.raises(JudgeError, match="257"):
        T.decode(torch.tensor([[1, 2, 257]]), ByteTokenizer())


def test_mauve_separates_sources(judge):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    a = [" ".join(rng.choice(words, 6)) for _ in range(60)]
    b = [" ".join(rng.choice(words, 6)) for _ in range(60)]
    noise = ["".join(chr(c) for c in rng.integers(33, 127, 30)) for _ in range(60)]
    fa, fb, fn = (T.features(judge, t) for t in (a, b, noise))
    assert fa.shape == (60, 32)
    same, different = T.mauve_score(fa, fb), T.mauve_score(fn, fb)
    assert same > 0.8 and different < 0.3, (same, different)


def test_elbo_of_a_uniform_model_is_log_v():
    """A zero-initialised DiT predicts uniformly: its bound is log V in expectation over the noise."""
    cfg = load_config(None, ["model.vocab_size=50", "data.synthetic.vocab_size=50", "data.seq_len=32",
                             "model.max_seq_len=32", "eval.batch_size=64"])
    model = DiT(cfg.model).eval()
    rows = torch.randint(0, 50, (512, 32), generator=torch.Generator().manual_seed(0))
    out = T.elbo_bound(model, cfg, rows, torch.device("cpu"), seed=3)
    assert abs(out["elbo_nll"] - math.log(50)) < 3 * out["elbo_nll_se"], out
    assert T.elbo_bound(model, cfg, rows, torch.device("cpu"), seed=3) == out  # fixed noise


def test_byte_tokenizer_decode_encode_is_the_identity():
    tok = ByteTokenizer()
    ids = [EOS, *"héllo".encode(), EOS, EOS, *b"x", EOS]
    assert tok.encode(tok.decode(ids)) == ids


def test_hf_judge_skips_the_first_token(tmp_path):
    """A Hugging Face causal LM + its tokenizer from one folder (a tiny GPT-2 and a BPE tokenizer
    trained here): no BOS, so every sample's first token is unscored, as in MDLM."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    corpus = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=bpe.get_vocab_size(), n_layer=1, n_embd=32, n_head=2,
                               n_positions=64)).save_pretrained(tmp_path, safe_serialization=True)
    judge = T.HFTextJudge(tmp_path)
    texts = ["the lazy fox<|endoftext|>tail", "pack my box"]
    seqs = T.retokenise(texts, judge)
    assert seqs[0][-1] == judge.tokenizer.eos_id and judge.tokenizer.eos_id not in seqs[1]
    got = T.gen_ppl_text(judge, texts)
    assert got["judge_tokens"] == sum(len(s) - 1 for s in seqs)
    nll = 0.0
    for s in seqs:
        with torch.no_grad():
            logits = judge.model(torch.tensor([s])).logits[0, :-1].double()
        nll -= float(torch.log_softmax(logits, -1)[torch.arange(len(s) - 1), torch.tensor(s[1:])].sum())
    assert got["gen_nll"] == pytest.approx(nll / got["judge_tokens"], rel=1e-5)
    assert T.features(judge, texts).shape == (2, 32)
