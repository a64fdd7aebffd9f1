"""The evaluation job on a text run: decoded samples, retokenised gen-PPL under the AR judge, MAUVE
and the likelihood bound in metrics.json (random teacher and judge: the numbers are not the point,
their presence, range and consistency are)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from tests.helpers import run_job
from trainer.config import load_config, save_config
from trainer.data.prepared import prepare_data
from trainer.model.dit import DiT
from trainer.runtime.checkpoint import export_weights

OVERRIDES = ["data.source=text", "data.tokenizer=byte", "data.seq_len=32", "data.num_train_sequences=256",
             "data.num_valid_sequences=48", "model.vocab_size=257", "model.max_seq_len=64", "model.d_model=32",
             "model.n_heads=4", "model.cond_dim=16", "eval.steps=[4]", "eval.num_samples=16", "eval.batch_size=16",
             "eval.mauve_samples=40", "eval.elbo_rows=48", "distill.rounds=1", "distill.start_steps=8",
             "targets.k=8"]


def _random_export(path: Path, cfg, causal: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    sd = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in DiT(cfg.model, causal=causal).state_dict().items()}
    export_weights(path, sd, sd, cfg, step=0)


def test_text_evaluation(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i}.txt").write_text(f"Document {i}: the quick brown fox jumps over the lazy dog. " * 3)
    lambada = tmp_path / "lambada_test.jsonl"
    lambada.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("the quick brown fox", "over the lazy dog",
                                                                          "Document 3: the")))
    run = tmp_path / "run"
    cfg = load_config(None, [*OVERRIDES, f"data.paths=[{corpus}/*.txt]", "eval.judge=ar",
                             f"eval.ar_path={tmp_path / 'ar' / 'export'}", f"eval.lambada={lambada}",
                             "eval.lambada_t_samples=4"])
    save_config(cfg, run / "config.yaml")
    prepare_data(cfg.data, run / "data")
    _random_export(run / "teacher" / "export", cfg, causal=False, seed=0)
    _random_export(tmp_path / "ar" / "export", cfg, causal=True, seed=1)
    run_job("trainer.jobs.evaluate", run, "--round", "0", nproc=1, config=None)
    m = json.loads((run / "teacher" / "eval" / "metrics.json").read_text())
    assert m["judge"] == "ar" and m["tokenizer"] == "byte" and m["prefix_tokens"] == 8
    assert 0 < m["elbo_nll"] < 2 * math.log(257) and m["elbo_rows"] == 48
    assert [r["steps"] for r in m["rows"]] == [4, 8]
    assert m["gen_protocol"] == "mdlm" and m["mauve_protocol"] == "heldout"  # the defaults
    assert m["lambada_examples"] == 3 and 0 <= m["lambada_acc"] <= 1 and m["lambada_ppl"] > 1
    for row in m["rows"]:
        assert row["gen_ppl"] > 1 and row["judge_tokens"] > 0 and 0 <= row["mauve"] <= 1
        assert row["entropy"] > 0 and row["gen_entropy"] > 0 and row["mauve_samples"] == 40
        assert row["samples"] == 16 and row["gen_protocol"] == "mdlm"  # eval.num_samples
    samples = (run / "teacher" / "eval" / "samples.txt").read_text()
    assert "# teacher round 0, 4 steps" in samples and not any(
        line.split() and all(w.isdigit() for w in line.split()) for line in samples.splitlines())
