"""trainer/evaluation/judges.py: one family of judges, one builder, two routes (ids, text) that agree.

Tiny models and tokenizers built in the test (nothing is downloaded)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import random_weights
from trainer.config import ModelConfig, load_config
from trainer.data.tokenizers import ByteTokenizer
from trainer.evaluation.judges import ARJudge, HFJudge, build_judge
from trainer.evaluation.quality import JudgeError, gen_ppl
from trainer.model.dit import DiT
from trainer.runtime.checkpoint import export_weights

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny GPT-2 and a BPE tokenizer trained here, saved in one folder as a judge is."""
    path = tmp_path_factory.mktemp("hf_judge")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=280, min_frequency=1,
                            special_tokens=["<|endoftext|>"])
    bpe.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=bpe.get_vocab_size(), n_layer=1, n_embd=16,
                                                         n_head=2, n_positions=32)).save_pretrained(path)
    return path


def test_the_ar_judges_two_routes_give_the_same_log_probs():
    """score_ids feeds BOS + the first L - 1 tokens and scores all L; run feeds BOS + all T tokens:
    on the same tokens their log-probs agree (float32 against float64 arithmetic)."""
    cfg = ModelConfig(vocab_size=257, n_layers=1, d_model=32, n_heads=2, cond_dim=16, max_seq_len=16)
    model = random_weights(DiT(cfg, causal=True)).train()
    judge = ARJudge(model, ByteTokenizer(), batch_size=2)
    x = torch.randint(0, 257, (3, 16), generator=torch.Generator().manual_seed(0))
    by_ids = judge.score_ids(x)
    by_run, hidden = judge.run(x[:, :-1])
    assert by_ids.shape == (3, 16) and by_run.shape == (3, 15) and hidden.shape == (3, 15, 32)
    torch.testing.assert_close(by_ids[:, :-1], by_run, atol=1e-5, rtol=0)
    torch.testing.assert_close(judge(x), by_ids)  # a judge is a quality.JudgeFn
    assert model.training  # the caller's mode is restored by both routes
    assert judge.max_tokens == 15  # the context less the BOS
    with pytest.raises(JudgeError, match="causal"):
        ARJudge(DiT(cfg, causal=False))
    with pytest.raises(JudgeError, match=r"judge ar: ids must lie in \[0, 257\)"):
        judge.score_ids(torch.full((1, 4), 257))


def test_the_hf_judges_two_routes_give_the_same_log_probs(hf_dir):
    ids_judge, text_judge = HFJudge(hf_dir, batch_size=2), HFJudge(hf_dir, dtype=None, with_tokenizer=True)
    assert ids_judge.tokenizer is None and text_judge.tokenizer.eos_id is not None
    x = torch.randint(0, ids_judge.vocab_size, (3, 10), generator=torch.Generator().manual_seed(1))
    logp, hidden = text_judge.run(x)
    assert torch.isnan(logp[:, 0]).all() and hidden.shape == (3, 10, 16)  # no BOS: the first token unscored
    torch.testing.assert_close(ids_judge.score_ids(x), logp[:, 1:], atol=1e-5, rtol=0)
    with pytest.raises(JudgeError, match="context of 32"):
        ids_judge.score_ids(torch.zeros((1, 33), dtype=torch.long))


def test_one_builder_for_both_routes_and_the_feature_model(hf_dir, tmp_path):
    tok = ByteTokenizer()
    assert build_judge(load_config(None, []), "cpu") is None  # eval.judge unset
    cfg = load_config(None, [f"eval.judge={hf_dir}", f"eval.mauve_features={hf_dir}", "eval.batch_size=3"])
    ids_judge, text_judge = build_judge(cfg, "cpu"), build_judge(cfg, "cpu", tok)
    assert isinstance(ids_judge, HFJudge) and ids_judge.tokenizer is None and ids_judge.batch_size == 3
    assert text_judge.tokenizer.name != tok.name  # a Hugging Face judge reads with its own tokenizer
    assert build_judge(cfg, "cpu", tok, key="mauve_features").name == hf_dir.name
    missing = load_config(None, [f"eval.mauve_features={tmp_path / 'nothing'}"])
    with pytest.raises(JudgeError, match=r"nothing \(eval.mauve_features\)"):
        build_judge(missing, "cpu", tok, key="mauve_features")

    # eval.judge=ar: the AR stage's export, with the run's tokenizer on the text route.
    run_cfg = load_config(None, ["model.vocab_size=257", "data.synthetic.vocab_size=257", "model.max_seq_len=16",
                                 "data.seq_len=16", "model.n_layers=1", "model.d_model=32", "model.n_heads=2"])
    state = random_weights(DiT(run_cfg.model, causal=True)).state_dict()
    export_weights(tmp_path / "ar", state, state, run_cfg, step=0)
    ar = load_config(None, ["eval.judge=ar", f"eval.ar_path={tmp_path / 'ar'}", "eval.batch_size=5"])
    ids_ar, text_ar = build_judge(ar, "cpu"), build_judge(ar, "cpu", tok)
    assert isinstance(ids_ar, ARJudge) and ids_ar.batch_size == 5 and text_ar.tokenizer is tok
    x = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(2))
    assert gen_ppl(ids_ar, x) == pytest.approx(gen_ppl(text_ar, x), rel=0)  # the same weights either way
    nowhere = load_config(None, ["eval.judge=ar", f"eval.ar_path={tmp_path / 'no_ar'}"])
    with pytest.raises(JudgeError, match="eval.ar_path: no AR export"):
        build_judge(nowhere, "cpu")
