"""The published evaluation protocols (issue 18), each stated from its reference code on a small example
and compared with ours: gen-PPL's tokens (MDLM/Duo, SDTT, first_doc), the entropies beside it, MAUVE in
SDTT's protocol, LAMBADA as SDTT computes it. The rules below are written out here, independently of
trainer/evaluation; the file:line of each rule is in docs/text.md's protocol table."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.helpers import byte_ar_judge, random_weights
from trainer.config import ConfigError, ModelConfig, load_config
from trainer.data.tokenizers import ByteTokenizer
from trainer.errors import BadInput
from trainer.evaluation import lambada as LB
from trainer.evaluation import mauve_protocol as MP
from trainer.evaluation import text as T
from trainer.evaluation.judges import ARJudge
from trainer.evaluation.quality import JudgeError, sequence_entropies
from trainer.model.dit import DiT

E = ByteTokenizer.eos_id
A, B, C, D = (ord(ch) for ch in "abcd")
EOS_TEXT = "<|endoftext|>"
# Fixed rows, as the judge's ids: a wrapped sample (its BOS first, a document boundary, trailing EOS),
# a sample without BOS whose first EOS is inside it, and one without any EOS.
ROWS = [[E, A, B, E, C, E, E], [A, B, E, C, D], [A, B, C]]
TEXTS = [f"{EOS_TEXT}ab{EOS_TEXT}c{EOS_TEXT}{EOS_TEXT}", f"ab{EOS_TEXT}cd", "abc"]
# The positions each protocol scores, by hand.
HAND = {
    # MDLM/Duo: positions 1..T-1, non-EOS tokens plus the first EOS. Row 0's first EOS is its BOS at 0.
    "mdlm": [[1, 2, 4], [1, 2, 3, 4], [1, 2]],
    # SDTT: every position 1..T-1.
    "sdtt": [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4], [1, 2]],
    # first_doc: cut after the first EOS; a leading EOS is context; this judge (own BOS) scores position 0.
    "first_doc": [[1, 2, 3], [0, 1, 2], [0, 1, 2]],
}


def mdlm_rule(x: torch.Tensor) -> torch.Tensor:
    """MDLM diffusion.py:566-573 / Duo metrics.py:205-210, as written there (weights of nlls[..., 1:])."""
    first_eos = (x == E).cumsum(-1) == 1
    token_mask = x != E
    return first_eos[..., 1:] + token_mask[..., 1:]


@pytest.fixture(scope="module")
def judge() -> ARJudge:
    return byte_ar_judge()


def _token_nll(judge: ARJudge, ids: list[int]) -> np.ndarray:
    """-log p(ids[i] | judge BOS, ids[:i]) for every i, one sequence alone (no batch, no padding)."""
    x = torch.tensor([[judge.vocab_size, *ids]])
    with torch.no_grad():
        logp = torch.log_softmax(judge.model(x)[0, :-1, :judge.vocab_size].double(), -1)
    return -logp[torch.arange(len(ids)), torch.tensor(ids)].numpy()


def _entropy(tokens: list[int]) -> float:
    _, counts = np.unique(tokens, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_the_hand_masks_are_the_reference_rules():
    for row, hand in zip(ROWS, HAND["mdlm"]):
        assert (1 + torch.nonzero(mdlm_rule(torch.tensor(row))).squeeze(-1)).tolist() == hand
    assert ByteTokenizer().encode_batch(TEXTS) == ROWS


@pytest.mark.parametrize("protocol", ["mdlm", "sdtt", "first_doc"])
def test_gen_ppl_golden_per_protocol(judge, protocol):
    """Each protocol's gen-NLL, scored-token counts and scored-token entropy on the fixed rows, from
    per-position NLLs of each row read alone and the hand masks above."""
    got = T.gen_ppl_text(judge, TEXTS, batch_size=2, protocol=protocol)  # padding inside a batch
    per_pos = [_token_nll(judge, row) for row in ROWS]
    sums = [float(nll[pos].sum()) for nll, pos in zip(per_pos, HAND[protocol])]
    counts = [len(pos) for pos in HAND[protocol]]
    if protocol == "sdtt":  # SDTT run_eval.py:238, 254: each sample's mean, then the mean, then exp
        want = float(np.mean([s / n for s, n in zip(sums, counts)]))
    else:  # MDLM/Duo: MeanMetric weighted by the mask, i.e. per token over all samples
        want = sum(sums) / sum(counts)
    assert got["gen_protocol"] == protocol
    assert got["judge_tokens_per_sample"] == counts
    assert got["gen_nll_sum_per_sample"] == pytest.approx(sums, rel=1e-5)
    assert got["gen_nll"] == pytest.approx(want, rel=1e-5)
    assert got["gen_ppl"] == pytest.approx(math.exp(want), rel=1e-5)
    want_ent = np.mean([_entropy([row[i] for i in pos]) for row, pos in zip(ROWS, HAND[protocol])])
    assert got["gen_entropy"] == pytest.approx(want_ent, rel=1e-9)


def test_gen_ppl_values_by_hand_for_a_uniform_judge():
    """A zero-initialised causal DiT predicts uniformly over its 257 ids: every scored token costs
    log 257, so gen-NLL is log 257 under any protocol and only the counts tell them apart."""
    judge = ARJudge(DiT(ModelConfig(vocab_size=257, n_layers=1, d_model=16, n_heads=2, cond_dim=8,
                                             max_seq_len=32), causal=True), ByteTokenizer())
    for protocol, total in (("mdlm", 9), ("sdtt", 12), ("first_doc", 9)):
        got = T.gen_ppl_text(judge, TEXTS, protocol=protocol)
        assert got["judge_tokens"] == total
        assert got["gen_nll"] == pytest.approx(math.log(257), rel=1e-6)
        assert sum(got["gen_nll_sum_per_sample"]) == pytest.approx(total * math.log(257), rel=1e-6)


def test_sdtt_scores_the_samples_own_ids_when_the_judge_shares_the_vocabulary(judge):
    """SDTT feeds the model's ids to GPT-2 as they are (run_eval.py:227-236): ``ids`` are scored, not
    the text's retokenisation; TextEvaluation passes them only for the same vocabulary."""
    other = [[A, B, C, D, A], [D, D, D]]
    direct = T.gen_ppl_text(judge, ["x", "y"], protocol="sdtt", ids=other)
    assert direct["judge_tokens_per_sample"] == [4, 2]
    assert direct["gen_nll_sum_per_sample"][0] == pytest.approx(float(_token_nll(judge, other[0])[1:].sum()), rel=1e-5)
    assert T.same_vocabulary(ByteTokenizer(), judge.tokenizer)
    cfg = load_config(None, ["eval.gen_ppl=sdtt", "eval.batch_size=2"])
    samples = torch.tensor([[E, A, B, E], [C, D, E, E]])
    ev = T.TextEvaluation(cfg, ByteTokenizer(), judge, samples, torch.device("cpu"))
    assert ev.gen_ppl(samples)["gen_nll"] == pytest.approx(
        T.gen_ppl_text(judge, [], protocol="sdtt", ids=samples.tolist())["gen_nll"], rel=1e-9)


def test_the_fields_entropy_is_duos_record_entropy():
    """Duo metrics.py:155-162: per sample, torch.unique counts -> entr(p).sum() (nats) over the whole
    sample's ids, then the mean over samples (main.py:123). Ours: quality.sequence_entropies."""
    rows = torch.tensor([[E, A, B, E, C, E, E], [A, A, A, B, B, C, D]])
    duo = []
    for sample in rows:
        _, counts = torch.unique(sample, return_counts=True, sorted=False)
        duo.append(torch.special.entr(counts.float() / counts.sum()).sum().item())
    assert sequence_entropies(rows).tolist() == pytest.approx(duo, rel=1e-6)


def test_reference_row_uses_the_same_protocol(judge):
    cfg = load_config(None, ["eval.num_samples=3", "eval.batch_size=2", "eval.gen_ppl=sdtt"])
    valid = torch.tensor([[E, A, B, E, C, E, E], [A, B, E, C, D, D, D], [A, B, C, C, C, C, C]])
    ref = T.TextEvaluation(cfg, ByteTokenizer(), judge, valid, torch.device("cpu")).reference()
    assert ref["gen_protocol"] == "sdtt" and ref["judge_tokens"] == 3 * 6
    assert ref["gen_entropy"] is not None


def test_config_refuses_unknown_protocols_and_sdtt_mauve_without_prompts():
    with pytest.raises(ConfigError, match="eval.gen_ppl"):
        load_config(None, ["eval.gen_ppl=duo"])
    with pytest.raises(ConfigError, match="eval.mauve_protocol"):
        load_config(None, ["eval.mauve_protocol=gpt2"])
    with pytest.raises(ConfigError, match="eval.mauve_prompts"):
        load_config(None, ["eval.mauve_protocol=sdtt"])
    assert load_config(None, []).eval.gen_ppl == "mdlm"


# --------------------------------------------------------------------------------------------------
# MAUVE in SDTT's protocol
# --------------------------------------------------------------------------------------------------
def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def test_sdtt_prompts_are_the_first_long_documents_cut(tmp_path):
    """SDTT dataloader.py:78-110: tokens without BOS/EOS, documents shorter than min_seq_len dropped,
    the rest cut to seq_len, the first num_samples kept in file order."""
    docs = ["a" * 5, "b" * 12, "c" * 3, "d" * 15, "e" * 20]
    path = _jsonl(tmp_path / "webtext.test.jsonl", docs)
    rows = MP.load_prompts(path, ByteTokenizer(), n=2, min_tokens=10, keep=8)
    assert rows.tolist() == [[ord("b")] * 8, [ord("d")] * 8]
    with pytest.raises(JudgeError, match=r"eval.mauve_prompts: .* has 3 documents of at least 10 tokens"):
        MP.load_prompts(path, ByteTokenizer(), n=4, min_tokens=10, keep=8)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(BadInput, match=r"bad.jsonl:2: no field 'text' \(eval.mauve_prompts\)"):
        MP.load_prompts(bad, ByteTokenizer(), n=2, min_tokens=1, keep=1)


def test_sdtt_mauve_end_to_end(tmp_path, judge):
    """eval.mauve_protocol=sdtt: prompts clamped, prompt + generated tokens sampled, several
    continuations per prompt, MAUVE over seeds reported as mean and population std."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta"]
    docs = [" ".join(rng.choice(words, 8)) for _ in range(45)]
    prompts = _jsonl(tmp_path / "prompts.jsonl", docs)
    cfg = load_config(None, ["data.seq_len=16", "model.max_seq_len=16", "model.vocab_size=257",
                             "data.synthetic.vocab_size=257", "model.d_model=32", "model.n_layers=1",
                             "model.cond_dim=16", "eval.batch_size=8", "eval.mauve_protocol=sdtt",
                             f"eval.mauve_prompts={prompts}", "eval.mauve_samples=40", "eval.mauve_prompt_tokens=6",
                             "eval.mauve_gen_tokens=6", "eval.mauve_min_doc_tokens=12", "eval.mauve_continuations=3",
                             "eval.mauve_seeds=2", "eval.elbo_rows=4"])
    model = random_weights(DiT(cfg.model), scale=0.02)
    docs_ids = MP.load_prompts(prompts, ByteTokenizer(), 40, 12, 12)
    cont = T.conditioned_samples(model, cfg, docs_ids, 4, 6, 3, torch.device("cpu"), length=12)
    assert cont.shape == (40, 12) and torch.equal(cont[:, :6], docs_ids[:, :6])
    valid = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    ev = T.TextEvaluation(cfg, ByteTokenizer(), judge, valid, torch.device("cpu"))
    rows = [{"steps": 4, "temperature": 1.0, "_samples": valid[:2]}]
    out = ev.measure(model, rows)
    row = rows[0]
    assert out["mauve_protocol"] == "sdtt" and out["prefix_tokens"] == 6
    assert row["mauve_protocol"] == "sdtt" and row["mauve_samples"] == 120
    assert len(row["mauve_per_seed"]) == 2 and 0 < row["mauve"] <= 1
    assert row["mauve"] == pytest.approx(np.mean(row["mauve_per_seed"]))
    assert row["mauve_std"] == pytest.approx(np.std(row["mauve_per_seed"]))
    # The compared sequences are the whole 12 tokens, prompt included, on both sides (SDTT
    # run_eval.py:52-53): the 40 documents' first 12 tokens against the 3 x 40 continuations. (40
    # prompts give MAUVE 4 buckets; with 2 its value hardly depends on the features.)
    conts = torch.cat([T.conditioned_samples(model, cfg, docs_ids, 4, 6, cfg.eval.seed + 1 + k, torch.device("cpu"),
                                             length=12) for k in range(3)])
    again = MP.mauve_over_seeds(T.features_ids(judge, docs_ids.tolist()), T.features_ids(judge, conts.tolist()), 2, 5.0)
    assert again["mauve_per_seed"] == pytest.approx(row["mauve_per_seed"], rel=1e-6)
    assert row["mauve_per_seed"][0] != row["mauve_per_seed"][1]  # the seeds change MAUVE's quantisation
    cut = MP.mauve_over_seeds(T.features_ids(judge, docs_ids[:, 6:].tolist()),
                              T.features_ids(judge, conts[:, 6:].tolist()), 2, 5.0)
    assert cut["mauve_per_seed"] != pytest.approx(row["mauve_per_seed"], rel=1e-3)  # without the prompt: another number


def test_mauve_over_seeds_separates_sources(judge):
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    a = [" ".join(rng.choice(words, 6)) for _ in range(50)]
    b = [" ".join(rng.choice(words, 6)) for _ in range(150)]  # 3 per "prompt", as SDTT's 5120 : 1024
    noise = ["".join(chr(c) for c in rng.integers(33, 127, 30)) for _ in range(150)]
    fa, fb, fn = (T.features(judge, t) for t in (a, b, noise))
    same, different = MP.mauve_over_seeds(fa, fb, 3, 5.0), MP.mauve_over_seeds(fa, fn, 3, 5.0)
    assert same["mauve"] > 0.8 and different["mauve"] < 0.3, (same, different)


# --------------------------------------------------------------------------------------------------
# LAMBADA as SDTT computes it
# --------------------------------------------------------------------------------------------------
def test_lambada_examples_are_split_at_the_last_space(tmp_path):
    """SDTT dataloader.py:298-334: prefix = text before the last space, [BOS] first; target = the
    rest, its leading space included, [EOS] last."""
    path = _jsonl(tmp_path / "lambada_test.jsonl", ["the cat sat", "abc"])
    (p1, t1), (p2, t2) = LB.load_examples(path, ByteTokenizer())
    assert p1 == [E, *b"the cat"] and t1 == [*b" sat", E]
    assert p2 == [E, *b"ab"] and t2 == [*b"c", E]  # no space: rfind gives -1
    with pytest.raises(JudgeError, match="eval.lambada"):
        LB.load_examples(tmp_path / "missing.jsonl", ByteTokenizer())


def _constant_model(bias: torch.Tensor) -> DiT:
    """A DiT whose every weight is zero but the output bias: its logits are ``bias`` at every position."""
    model = DiT(ModelConfig(vocab_size=257, n_layers=1, d_model=16, n_heads=2, cond_dim=8, max_seq_len=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.output_layer.linear.bias.copy_(bias)
    return model


def test_lambada_accuracy_and_bound_by_hand(tmp_path):
    """Logits fixed to a bias that favours the space byte: greedy decoding of all masked target
    tokens at once gets only the one-token target " " right; the bound's expectation is
    (1 - eps) x sum of the target tokens' -log p (each masked with probability (1 - eps) t, weight 1/t)."""
    bias = torch.zeros(258)
    bias[32], bias[ord("b")] = 4.0, 2.0
    model = _constant_model(bias)
    path = _jsonl(tmp_path / "lambada_test.jsonl", ["hello ", "the cat sat", "a b"])
    examples = LB.load_examples(path, ByteTokenizer())
    eps = 1e-3
    out = LB.evaluate(model, examples, 257, eps, 1e-5, False, torch.device("cpu"), t_samples=16384, seed=0)
    assert out["lambada_correct_per_example"] == [1, 0, 0] and out["lambada_acc"] == pytest.approx(1 / 3)
    logp = torch.log_softmax(bias[:257].double(), -1)
    for (_, target), got in zip(examples, out["lambada_nll_per_example"]):
        want = (1 - eps) * float(-logp[torch.tensor(target[:-1])].sum())
        assert got == pytest.approx(want, rel=0.08), (target, got, want)
    assert out["lambada_ppl"] == pytest.approx(math.exp(np.mean(out["lambada_nll_per_example"])), rel=1e-5)


def test_protocol_files_are_resolved_at_submit_time(tmp_path):
    """eval.lambada / eval.mauve_prompts are paths: made absolute against the submitting directory
    and refused there, one line naming the key, when the run would read a missing file."""
    from trainer.config import resolve_paths

    (tmp_path / "lambada_test.jsonl").write_text('{"text": "a b"}\n')
    cfg = load_config(None, ["eval.lambada=lambada_test.jsonl", "eval.mauve_protocol=sdtt",
                             "eval.mauve_prompts=webtext.test.jsonl"])
    out, problems = resolve_paths(cfg, tmp_path)
    assert out.eval.lambada == str(tmp_path / "lambada_test.jsonl")
    assert problems == [f"bad config key 'eval.mauve_prompts': 'webtext.test.jsonl' does not exist "
                        f"(as {tmp_path / 'webtext.test.jsonl'})"]
    heldout = load_config(None, ["eval.mauve_prompts=webtext.test.jsonl"])  # not read by the default protocol
    assert resolve_paths(heldout, tmp_path)[1] == []


def test_report_names_the_protocols_and_carries_lambada(tmp_path):
    """The text section says which protocol scored gen-PPL and MAUVE; LAMBADA reaches the bound table
    and the hparams summary."""
    from trainer.evaluation import text_report

    d = tmp_path / "teacher" / "eval"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({
        "model": "teacher", "round": 0, "round_steps": 8, "judge": "gpt2-large", "tokenizer": "gpt2",
        "gen_protocol": "mdlm", "mauve_protocol": "sdtt", "mauve_features": "gpt2-large", "prefix_tokens": 50,
        "elbo_nll": 3.0, "elbo_nll_se": 0.1, "elbo_ppl": 20.0, "elbo_rows": 48, "lambada_acc": 0.4,
        "lambada_ppl": 50.0,
        "rows": [{"steps": 8, "gen_ppl": 50.0, "entropy": 5.6, "gen_entropy": 5.4, "mauve": 0.9, "mauve_std": 0.01,
                  "judge_tokens": 100, "samples": 16}]}))
    md = text_report.markdown_section(tmp_path, rounds=0)
    assert "protocol `mdlm`" in md and "MDLM's and Duo's tokens" in md and "SDTT's protocol: 50-token prompts" in md
    assert "lambada_acc" in md and "0.4000" in md and "gen_entropy" in md and "mauve_std" in md
    final = text_report.final_metrics(tmp_path, rounds=0)
    assert final["final/teacher/lambada_acc"] == 0.4 and final["final/teacher/gen_entropy"] == 5.4


def test_same_vocabulary_compares_what_ids_mean(tmp_path):
    """Two folders holding the same BPE (one with a tokenizer_config.json, one without) share a
    vocabulary; a BPE trained on other text does not, nor does the byte tokenizer."""
    from tokenizers import ByteLevelBPETokenizer

    from trainer.data.tokenizers import HFTokenizer

    def bpe(folder, corpus, config: bool):
        folder.mkdir()
        tok = ByteLevelBPETokenizer()
        tok.train_from_iterator(corpus, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
        tok.save(str(folder / "tokenizer.json"))
        if config:
            (folder / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
        return HFTokenizer(folder)

    text = ["the quick brown fox jumps over the lazy dog"] * 20
    a, b = bpe(tmp_path / "a", text, True), bpe(tmp_path / "b", text, False)
    other = bpe(tmp_path / "c", ["pack my box with five dozen liquor jugs, sphinx of black quartz"] * 20, True)
    assert a.name != b.name and T.same_vocabulary(a, b)
    assert not T.same_vocabulary(a, other) and not T.same_vocabulary(a, ByteTokenizer())


def test_lambada_longer_than_the_context_is_one_clear_line(tmp_path):
    cfg = load_config(None, ["data.seq_len=16", "model.max_seq_len=16", "model.vocab_size=257",
                             "data.synthetic.vocab_size=257", "model.d_model=32", "model.n_layers=1",
                             "model.cond_dim=16", f"eval.lambada={tmp_path / 'lambada_test.jsonl'}"])
    _jsonl(tmp_path / "lambada_test.jsonl", ["a short one", "this passage is far too long for sixteen tokens"])
    ev = T.TextEvaluation(cfg, ByteTokenizer(), None, torch.zeros(2, 16, dtype=torch.long), torch.device("cpu"))
    with pytest.raises(JudgeError, match=r"eval.lambada: example 2 of .*lambada_test.jsonl is 49 tokens"):
        ev.lambada(DiT(cfg.model))
