"""trainer/evaluation/quality.py, the judges' ids route (trainer/evaluation/judges.py) and the Hugging
Face side of trainer/data/tokenizers.py, on tiny models and tokenizers built in the test (nothing is
downloaded)."""
from __future__ import annotations

import json
import math
import shutil
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

from trainer.config import ModelConfig, SyntheticConfig
from trainer.data.synthetic import MarkovSource
from trainer.data.tokenizers import HFTokenizer, TokenizerError, load_tokenizer
from trainer.evaluation.judges import ARJudge, HFJudge
from trainer.evaluation.quality import (
    JudgeError,
    bigram_kl,
    exact_nll,
    gen_ppl,
    markov_quality,
    unigram_entropy,
)

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

CORPUS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "hello world"] * 5


@pytest.fixture(scope="module")
def source() -> MarkovSource:
    return MarkovSource(SyntheticConfig())  # the tiny config's chain


def _collapsed(source: MarkovSource, first: np.ndarray, length: int) -> np.ndarray:
    """Greedy sequences: always the most likely successor (maximal mode collapse)."""
    p = source.transition_matrix()
    x = np.empty((first.size, length), dtype=np.int64)
    x[:, 0] = first
    for t in range(1, length):
        x[:, t] = p[x[:, t - 1]].argmax(axis=1)
    return x


# --------------------------------------------------------------------------------------------------
# Metrics against the synthetic source
# --------------------------------------------------------------------------------------------------
def test_exact_nll(source):
    x = source.sample(500, 64, np.random.default_rng(1))
    mean, se = exact_nll(source, torch.from_numpy(x))
    per_seq = source.nll_per_token(x)
    assert mean == pytest.approx(per_seq.mean())
    assert se == pytest.approx(per_seq.std(ddof=1) / math.sqrt(500))
    assert abs(mean - source.sequence_entropy_per_token(64)) < 4 * se
    q = markov_quality(source, x)
    assert q["nll_gap"] == pytest.approx(mean - source.sequence_entropy_per_token(64))
    assert set(q) == {"nll", "nll_se", "nll_floor", "nll_gap", "entropy", "bigram_kl", "invalid_rate",
                      "invalid_rate_se", "valid_nll", "valid_nll_se"}


def test_unigram_entropy():
    x = np.array([[0, 0, 1, 1], [2, 2, 2, 2], [3, 0, 2, 1]])
    assert unigram_entropy(x) == pytest.approx((math.log(2) + 0 + math.log(4)) / 3)
    assert unigram_entropy(torch.tensor([[5, 5, 5, 9]])) == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_bigram_kl_rewards_true_samples_and_punishes_collapse(source):
    rng = np.random.default_rng(2)
    small, large = source.sample(100, 64, rng), source.sample(1600, 64, rng)
    kl_small, kl_large = bigram_kl(source, small), bigram_kl(source, large)
    assert 0 <= kl_large < kl_small < 0.1
    assert kl_large < 0.01
    collapsed = _collapsed(source, large[:, 0], 64)
    # Collapse is more LIKELY under the source (lower NLL) yet far worse on diversity.
    assert exact_nll(source, collapsed).mean < exact_nll(source, large).mean - 0.2
    assert unigram_entropy(collapsed) < unigram_entropy(large) - 1.0
    assert bigram_kl(source, collapsed) > 1.0 > 50 * kl_large
    assert bigram_kl(source, collapsed, smoothing=0.0) == math.inf
    with pytest.raises(ValueError, match="smoothing"):
        bigram_kl(source, large, smoothing=-1)


# --------------------------------------------------------------------------------------------------
# Generative perplexity
# --------------------------------------------------------------------------------------------------
def test_gen_ppl_is_exp_mean_nll():
    judge = lambda ids: torch.full((ids.shape[0], ids.shape[1] - 1), -math.log(7.0))
    assert gen_ppl(judge, np.zeros((3, 5), dtype=np.int64)) == pytest.approx(7.0)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    return path, model.eval()


def test_hf_judge_scores_like_the_model(gpt2_dir):
    path, model = gpt2_dir
    x = torch.randint(0, 50, (5, 12), generator=torch.Generator().manual_seed(0))
    judge = HFJudge(path, batch_size=2)
    logp = judge(x)
    assert logp.shape == (5, 11) and logp.dtype == torch.float64
    with torch.no_grad():
        ref = torch.log_softmax(model(x).logits[:, :-1], -1).gather(-1, x[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logp, ref.double(), atol=1e-5, rtol=0)
    assert gen_ppl(judge, x) == pytest.approx(math.exp(-ref.double().mean().item()), rel=1e-5)
    assert HFJudge(path, bos_id=0)(x).shape == (5, 12)
    with pytest.raises(JudgeError, match=r"ids must lie in \[0, 50\)"):
        judge(torch.full((1, 4), 50))
    with pytest.raises(JudgeError, match="context of 16"):
        judge(torch.zeros((1, 17), dtype=torch.long))
    with pytest.raises(JudgeError, match="no_such_dir"):
        HFJudge(path / "no_such_dir")


def test_hf_judge_of_a_uniform_model_has_ppl_equal_to_vocab(gpt2_dir, tmp_path):
    _, model = gpt2_dir
    uniform = transformers.GPT2LMHeadModel(model.config)
    with torch.no_grad():
        uniform.transformer.wte.weight.zero_()  # tied head: every logit is 0
    uniform.save_pretrained(tmp_path)
    x = torch.randint(0, 50, (4, 10), generator=torch.Generator().manual_seed(1))
    assert gen_ppl(HFJudge(tmp_path), x) == pytest.approx(50.0, rel=1e-6)


class _MarkovAR(nn.Module):
    """A causal stand-in for DiT(cfg, causal=True): logits depend on the previous token only and are
    the source's exact log-probabilities (BOS row = stationary law; a huge MASK logit that the judge
    must ignore)."""

    causal = True

    def __init__(self, source: MarkovSource):
        super().__init__()
        v = source.vocab_size
        self.cfg = types.SimpleNamespace(vocab_size=v)
        table = torch.full((v + 1, v + 1), 30.0, dtype=torch.float64)
        table[:v, :v] = torch.from_numpy(np.log(source.transition_matrix()))
        table[v, :v] = torch.from_numpy(np.log(source.stationary))
        self.table = nn.Parameter(table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x]


def test_own_ar_judge_reproduces_the_exact_likelihood(source):
    x = source.sample(6, 20, np.random.default_rng(3))
    model = _MarkovAR(source).train()
    judge = ARJudge(model, batch_size=4)
    logp = judge(torch.from_numpy(x))
    assert logp.shape == (6, 20)
    np.testing.assert_allclose(logp.sum(1).numpy(), source.log_prob(x), rtol=1e-5)
    assert model.training  # the caller's mode is restored
    assert gen_ppl(judge, x) == pytest.approx(math.exp(source.nll_per_token(x).mean()), rel=1e-5)


def test_own_ar_judge_with_the_project_dit():
    from trainer.model.dit import DiT

    cfg = ModelConfig(vocab_size=32, n_layers=1, d_model=32, n_heads=2, cond_dim=16, max_seq_len=16)
    with pytest.raises(JudgeError, match="causal"):
        ARJudge(DiT(cfg, causal=False))
    x = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(0))
    logp = ARJudge(DiT(cfg, causal=True))(x)
    assert logp.shape == (3, 16) and bool((logp < 0).all())


# --------------------------------------------------------------------------------------------------
# Hugging Face tokenizers from local files
# --------------------------------------------------------------------------------------------------
def _byte_bpe() -> tokenizers.ByteLevelBPETokenizer:
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return tok


def test_hf_tokenizer_from_save_pretrained(tmp_path):
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=_byte_bpe()._tokenizer,
                                                eos_token="<|endoftext|>")
    fast.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert isinstance(tok, HFTokenizer)
    text = "the cat sat on the log"
    assert tok.encode(text) == fast.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == fast.eos_token_id and tok.vocab_size == len(fast)
    assert tok.encode_batch([text, "hello"]) == [tok.encode(text), tok.encode("hello")]
    # The name depends on the files, not on where they are.
    shutil.copytree(tmp_path / "tok", tmp_path / "copy" / "tok")
    assert HFTokenizer(tmp_path / "copy" / "tok").name == tok.name


def test_hf_tokenizer_from_gpt2_vocab_and_merges(tmp_path):
    bpe = _byte_bpe()
    bpe.save_model(str(tmp_path))  # vocab.json + merges.txt, the GPT-2 layout
    tok = HFTokenizer(tmp_path)
    gpt2 = transformers.GPT2TokenizerFast.from_pretrained(tmp_path, local_files_only=True)
    for text in ["the dog and the cat", " leading space", "unseen wörds!"]:
        assert tok.encode(text) == gpt2.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == bpe.token_to_id("<|endoftext|>")
    other = tmp_path / "other"
    other.mkdir()
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    (other / "vocab.json").write_text(json.dumps(dict(vocab, zzz=len(vocab))))
    shutil.copy(tmp_path / "merges.txt", other / "merges.txt")
    assert HFTokenizer(other).name != tok.name


def test_hf_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        HFTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        HFTokenizer(tmp_path)
