"""The text chain on the real local SLURM cluster (issue 13): a corpus written here, a byte-level BPE
tokenizer (a few thousand tokens) trained here with ``tokenizers``, MDLM's wrapped rows, its last
150 documents held out for validation, the AR judge
trained by the chain's own AR stage, a few steps per stage; the report shows retokenised gen-PPL,
entropy and MAUVE for the teacher and every student."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.helpers import read_tb_scalars
from tests.helpers.slurm import FIT, SLURM_FLAGS, LocalSlurm, on_slurm, state, submit, wait_for_run
from trainer.data.tokenizers import HFTokenizer

WORDS = ("the a one every some river stone light garden city winter music letter window train teacher student "
         "runs falls grows sings waits opens closes carries finds keeps slowly quietly again today near under "
         "over beside before after and but").split()


def write_corpus(root: Path, docs: int = 1500, seed: int = 0) -> Path:
    """Sentences from a small vocabulary with some structure (a word often repeats its neighbour's
    class), as jsonl: ~300 KB, enough for a BPE of a few thousand tokens and a few hundred rows."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    with (root / "corpus.jsonl").open("w") as f:
        for i in range(docs):
            sentences = []
            for _ in range(rng.randint(2, 6)):
                n = rng.randint(4, 12)
                start = rng.randrange(len(WORDS))
                words = [WORDS[(start + rng.choice((0, 1, 1, 2, 3))) % len(WORDS)] for _ in range(n)]
                sentences.append(" ".join(words).capitalize() + rng.choice((".", ".", "!", "?")))
            f.write(json.dumps({"text": f"Note {i}. " + " ".join(sentences)}) + "\n")
    return root / "corpus.jsonl"


@pytest.fixture(scope="module")
def text_run(slurm_cluster: LocalSlurm, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tools.train_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("slurm-text")
    corpus = write_corpus(root / "corpus")
    tok_dir = train_tokenizer([str(corpus)], root / "tokenizer", vocab_size=2048, min_frequency=1)
    vocab = HFTokenizer(tok_dir).vocab_size
    assert 1000 < vocab <= 2048, vocab
    run = root / "run"
    overrides = [
        "data.source=text", f"data.paths=[{corpus}]", f"data.tokenizer={tok_dir}", "data.wrap=true",
        "data.seq_len=32", "data.num_train_sequences=0", "data.num_valid_sequences=64", "data.workers=1",
        "data.valid_docs=150", "data.expect_docs=1500",
        f"model.vocab_size={vocab}", "model.max_seq_len=32", "model.d_model=64", "model.cond_dim=32",
        "train.steps=40", "train.eval_every=20", "train.ckpt_every=20", "optim.warmup_steps=5",
        "train.eval_batches=1", "teacher.train_ar=true", "eval.judge=ar",
        "distill.rounds=2", "distill.start_steps=16", "distill.steps_per_round=6", "distill.warmup_steps=1",
        "targets.num_samples=64", "targets.samples_per_shard=32", "targets.k=8",
        "eval.steps=[4,16]", "eval.num_samples=32", "eval.batch_size=32", "eval.mauve_samples=32",
        "eval.elbo_rows=64"]
    submit("--config", "configs/tiny.yaml", *SLURM_FLAGS, "--run-dir", str(run), *overrides, *FIT)
    wait_for_run(run, 1800)
    return run


@on_slurm
def test_the_text_chain_reports_the_fields_measures(text_run: Path) -> None:
    run = text_run
    st = state(run)
    assert {"prepare", "teacher", "ar", "eval_0", "distill_1", "distill_2", "eval_2", "report"} <= set(st)
    assert all("job_id" in e for e in st.values())  # every stage, the AR one included, a SLURM job
    data = json.loads((run / "data" / "data.json").read_text())
    assert data["wrap"] is True and data["dtype"] == "uint16" and data["num_train"] > 100
    assert (data["num_docs"], data["train_docs"], data["valid_docs"]) == (1500, 1350, 150)  # held out

    report = json.loads((run / "report.json").read_text())
    for r, model in ((0, "teacher"), (1, "student"), (2, "student")):
        ev = json.loads((run / ("teacher" if r == 0 else f"round_{r}") / "eval" / "metrics.json").read_text())
        assert ev["judge"] == "ar" and ev["elbo_nll"] > 0, ev
        for row in ev["rows"]:
            assert row["gen_ppl"] > 1 and row["judge_tokens"] > 0 and row["entropy"] > 0
            assert 0 < row["mauve"] <= 1
        mine = [row for row in report["rows"] if (row["model"], row["round"]) == (model, r)]
        assert {row["steps"] for row in mine} >= {4, 16} and all(row["mauve"] is not None for row in mine)
    md = (run / "report.md").read_text()
    assert "## Text, in the field's protocol" in md and "Judge: ar" in md
    section = md.split("### Each model at its own step count")[1].split("###")[0]
    for name in ("teacher", "student"):
        assert name in section
    for col in ("gen_ppl", "entropy", "mauve"):
        assert col in section
    # Samples are text, and TensorBoard has the hparams summary with each model's final metrics.
    samples = (run / "round_2" / "eval" / "samples.txt").read_text()
    assert "Note" in samples or any(w in samples.lower() for w in WORDS)
    hp = read_tb_scalars(run / "tb" / "hparams")
    assert {"final/teacher/gen_ppl", "final/round_2/mauve", "final/round_1/elbo_nll"} <= set(hp)
