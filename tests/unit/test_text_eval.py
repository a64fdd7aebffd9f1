"""trainer/evaluation/text.py: the field's text protocol, checked against direct computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.helpers import byte_ar_judge, random_weights
from trainer.config import load_config
from trainer.data.tokenizers import ByteTokenizer
from trainer.evaluation import text as T
from trainer.evaluation.judges import ARJudge, build_judge
from trainer.evaluation.quality import JudgeError
from trainer.model.dit import DiT

EOS = ByteTokenizer.eos_id


@pytest.fixture(scope="module")
def judge() -> ARJudge:
    return byte_ar_judge()


def test_cut_at_eos():
    assert T.cut_at_eos([EOS, EOS, 1, 2, EOS, 3, EOS], EOS) == [EOS, 1, 2, EOS]  # one BOS kept as context
    assert T.cut_at_eos([1, 2, 3], EOS) == [1, 2, 3]
    assert T.cut_at_eos([EOS, EOS], EOS) == [EOS]


def _direct_nll(judge: ARJudge, ids: list[int]) -> float:
    """One sequence alone (no batch, no padding): BOS, then -sum log p(token | before)."""
    x = torch.tensor([[judge.vocab_size, *ids]])
    with torch.no_grad():
        logp = torch.log_softmax(judge.model(x)[0, :-1, :judge.vocab_size].double(), -1)
    return float(-logp[torch.arange(len(ids)), torch.tensor(ids)].sum())


def test_first_doc_gen_ppl_scores_up_to_the_first_eos(judge):
    texts = ["hello world<|endoftext|>ignored tail", "ab", "<|endoftext|>a much longer sample than the others"]
    got = T.gen_ppl_text(judge, texts, batch_size=2, protocol="first_doc")  # padding inside batches
    tok = ByteTokenizer()
    seqs = [[*tok.encode("hello world"), EOS], tok.encode(texts[1]), tok.encode(texts[2])]
    # The third starts with the row's BOS: read as context, not scored.
    nll = _direct_nll(judge, seqs[0]) + _direct_nll(judge, seqs[1]) + _direct_nll(judge, seqs[2]) \
        - _direct_nll(judge, seqs[2][:1])
    n = sum(len(s) for s in seqs) - 1
    assert got["judge_tokens"] == n
    assert got["gen_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)  # float32 forwards, batched or not
    # What follows the first EOS changes nothing.
    other = T.gen_ppl_text(judge, ["hello world<|endoftext|>something else entirely", *texts[1:]],
                           protocol="first_doc")
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
    judge = build_judge(load_config(None, [f"eval.judge={tmp_path}"]), "cpu", ByteTokenizer())  # the text route
    assert judge.tokenizer.name != ByteTokenizer().name  # its own tokenizer, not the run's
    texts = ["the lazy fox<|endoftext|>tail", "pack my box"]
    seqs = T.retokenise(texts, judge)
    assert seqs[0][-1] == judge.tokenizer.eos_id and judge.tokenizer.eos_id not in seqs[1]
    got = T.gen_ppl_text(judge, texts, protocol="first_doc")
    assert got["judge_tokens"] == sum(len(s) - 1 for s in seqs)
    nll = 0.0
    for s in seqs:
        with torch.no_grad():
            logits = judge.model(torch.tensor([s])).logits[0, :-1].double()
        nll -= float(torch.log_softmax(logits, -1)[torch.arange(len(s) - 1), torch.tensor(s[1:])].sum())
    assert got["gen_nll"] == pytest.approx(nll / got["judge_tokens"], rel=1e-5)
    assert T.features(judge, texts).shape == (2, 32)


def test_render_samples_decodes_text_sources():
    from trainer.config import DataConfig
    from trainer.data.tokenizers import render_samples

    rows = [[104, 105, 10, 256], [104, 257, 105, 106]]  # "hi\n<eos>", and one holding MASK (257)
    assert render_samples(DataConfig(source="text", paths=["x"]), rows) == ["hi\\n<|endoftext|>", "104 257 105 106"]
    assert render_samples(DataConfig(), [[1, 2]]) == ["1 2"]


def test_report_text_section_and_hparams(tmp_path):
    """The report's text tables and the TensorBoard hparams summary, from evaluation files."""
    import json as _json

    from tests.helpers import read_tb_scalars
    from trainer.evaluation import text_report
    from trainer.runtime.metrics import MetricsWriter

    def ev(model, r, round_steps, rows):
        d = tmp_path / ("teacher" if r == 0 else f"round_{r}") / "eval"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(_json.dumps({
            "model": model, "round": r, "round_steps": round_steps, "judge": "ar", "tokenizer": "byte",
            "prefix_tokens": 8, "elbo_nll": 3.0 - r, "elbo_nll_se": 0.1, "elbo_ppl": 20.0, "elbo_rows": 48,
            "rows": [{"steps": s, "gen_ppl": g, "entropy": 4.0, "mauve": m, "judge_tokens": 100, "samples": 16}
                     for s, g, m in rows]}))

    ev("teacher", 0, 8, [(4, 90.0, 0.2), (8, 50.0, 0.5)])
    ev("student", 1, 4, [(4, 60.0, 0.4), (8, 45.0, 0.6)])
    md = text_report.markdown_section(tmp_path, rounds=1)
    assert "Judge: ar" in md and "mauve" in md and "elbo_nll" in md
    final = text_report.final_metrics(tmp_path, rounds=1)
    assert final == {"final/teacher/gen_ppl": 50.0, "final/teacher/entropy": 4.0, "final/teacher/mauve": 0.5,
                     "final/teacher/elbo_nll": 3.0, "final/round_1/gen_ppl": 60.0, "final/round_1/entropy": 4.0,
                     "final/round_1/mauve": 0.4, "final/round_1/elbo_nll": 2.0}
    hp = text_report.hparams(load_config(None, []))
    assert hp["model.d_model"] == 128 and hp["eval.steps"] == "[8, 16, 32, 64, 128, 256, 512, 1024]"
    with MetricsWriter(tmp_path, enabled=True) as mw:
        mw.hparams(hp, final)
    tb = read_tb_scalars(tmp_path / "tb" / "hparams")
    assert tb["final/round_1/mauve"][0][1] == pytest.approx(0.4)
    assert text_report.markdown_section(tmp_path / "nothing", rounds=1) == ""


def test_per_sample_scores_add_up_to_gen_ppl(judge):
    texts = ["hello world<|endoftext|>tail", "ab", "<|endoftext|>a longer sample"]
    got = T.gen_ppl_text(judge, texts, batch_size=2, protocol="first_doc")
    sums, counts = np.array(got["gen_nll_sum_per_sample"]), np.array(got["judge_tokens_per_sample"])
    assert counts.tolist() == [12, 2, len("a longer sample")]  # BOS context unscored, tail after EOS dropped
    assert got["judge_tokens"] == counts.sum()
    assert got["gen_nll"] == pytest.approx(sums.sum() / counts.sum(), rel=1e-7)  # sums kept to 6 decimals
    alone = T.gen_ppl_text(judge, texts[1:2], protocol="first_doc")  # a sample's score does not depend on its batch
    assert alone["gen_nll_sum_per_sample"][0] == pytest.approx(sums[1], rel=1e-5)


def test_reference_row_is_the_held_out_texts_entropy_and_score(judge):
    from trainer.evaluation.quality import sequence_entropies

    cfg = load_config(None, ["eval.num_samples=3", "eval.batch_size=2"])
    valid = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(1))
    ev = T.TextEvaluation(cfg, ByteTokenizer(), judge, valid, torch.device("cpu"))
    ref = ev.reference()
    assert ref["samples"] == 3
    assert ref["entropy"] == pytest.approx(float(sequence_entropies(valid[:3]).mean()))
    assert ref["gen_nll"] == pytest.approx(T.gen_ppl_text(judge, ev.decode(valid[:3]))["gen_nll"], rel=1e-6)
    no_judge = T.TextEvaluation(cfg, ByteTokenizer(), None, valid, torch.device("cpu")).reference()
    assert no_judge["gen_nll"] is None and no_judge["entropy"] == ref["entropy"]


def test_conditioned_samples_follow_the_rows_temperature():
    """MAUVE's continuations are drawn at the evaluation row's temperature, not always at 1."""
    cfg = load_config(None, ["data.seq_len=16", "model.max_seq_len=16", "model.vocab_size=257",
                             "data.synthetic.vocab_size=257", "model.d_model=32", "model.n_layers=1",
                             "model.cond_dim=16", "eval.batch_size=4"])
    model = random_weights(DiT(cfg.model), scale=0.02)  # small logits: temperature 1 is near uniform, 0.05 is not
    rows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    cont = {t: T.conditioned_samples(model, cfg, rows, 8, 4, 7, torch.device("cpu"), temperature=t)
            for t in (1.0, 0.05)}
    assert torch.equal(cont[1.0][:, :4], rows[:, :4]) and torch.equal(cont[0.05][:, :4], rows[:, :4])
    assert not torch.equal(cont[1.0], cont[0.05])
    same = T.conditioned_samples(model, cfg, rows, 8, 4, 7, torch.device("cpu"))
    assert torch.equal(same, cont[1.0])
