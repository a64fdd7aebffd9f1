"""A teacher in the published MDLM layout at GPT-2's vocabulary (50,257 + MASK, random weights, a small
shape) goes through the real jobs: import -> prepare -> targets -> distill -> export in the published
layout (tools/export_mdlm.py) -> import again, with weights equal to the student's."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from tests.helpers import REPO, env, run_job
from trainer.model.dit import DiT
from trainer.model.mdlm_import import import_mdlm
from trainer.runtime.checkpoint import load_exported

GPT2_VOCAB = 50257
SHAPE = dict(vocab_size=GPT2_VOCAB, n_layers=2, d_model=32, n_heads=4, cond_dim=16, max_seq_len=32)
OVERRIDES = [*(f"model.{k}={v}" for k, v in SHAPE.items()),
             "data.source=synthetic", f"data.synthetic.vocab_size={GPT2_VOCAB}", "data.seq_len=32",
             "data.num_train_sequences=64", "data.num_valid_sequences=8",
             "targets.num_samples=8", "targets.samples_per_shard=4", "targets.batch_size=4", "targets.k=8",
             "sampling.steps=4", "distill.rounds=1", "distill.start_steps=4", "distill.steps_per_round=2",
             "distill.global_batch_size=4", "distill.warmup_steps=0", "distill.lr=1e-2", "distill.loader_workers=0",
             "engine.global_batch_size=4", "train.log_every=1"]


def _published_teacher(directory):
    """Random non-zero weights written as MDLM publishes them: ``backbone.`` keys, the rotary table,
    config.json in MDLM's field names (the importer's test checks this layout against a reference)."""
    from trainer.config import ModelConfig

    cfg = ModelConfig(**SHAPE)
    g = torch.Generator().manual_seed(0)
    sd = {"backbone." + k: 0.2 * torch.randn(v.shape, generator=g) for k, v in DiT(cfg).state_dict().items()}
    hd = SHAPE["d_model"] // SHAPE["n_heads"]
    sd["backbone.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    directory.mkdir(parents=True)
    save_file(sd, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({
        "vocab_size": GPT2_VOCAB + 1, "model_length": 32, "hidden_dim": 32, "cond_dim": 16, "n_blocks": 2,
        "n_heads": 4, "dropout": 0.1, "time_conditioning": False}))
    return directory


def test_published_teacher_round_trips_through_distillation(tmp_path):
    src = _published_teacher(tmp_path / "mdlm-owt-small")
    run = tmp_path / "run"
    run_job("trainer.jobs.import_teacher", run, *OVERRIDES, "teacher.source=import", f"teacher.import_path={src}",
            nproc=1, config=None)
    run_job("trainer.jobs.prepare", run, nproc=1, config=None)
    run_job("trainer.jobs.targets", run, "--round", "1", nproc=1, config=None)
    run_job("trainer.jobs.distill", run, "--round", "1", nproc=1, config=None)

    student_ema, _ = load_exported(run / "round_1" / "student" / "export", "ema")
    teacher_ema, _ = load_exported(run / "teacher" / "export", "ema")
    assert any(not torch.equal(student_ema[k], teacher_ema[k]) for k in student_ema), "distillation changed nothing"

    for which in ("ema", "raw"):
        out = tmp_path / f"student-{which}"
        proc = subprocess.run([sys.executable, "tools/export_mdlm.py", "--run-dir", str(run), "--round", "1",
                               "--weights", which, "--out", str(out)], cwd=REPO, env=env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        # The same layout as the published teacher: same keys, shapes and config fields.
        published, ours = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in published.items()}
        theirs, mine = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
        # dropout is the run's training setting (model.dropout), not a property of the weights
        assert {k: mine[k] for k in theirs if k != "dropout"} == {k: v for k, v in theirs.items() if k != "dropout"}
        model, cfg = import_mdlm(out)
        expected, _ = load_exported(run / "round_1" / "student" / "export", which)
        back = model.state_dict()
        assert cfg.vocab_size == GPT2_VOCAB and back.keys() == expected.keys()
        assert all(torch.equal(back[k], expected[k]) for k in expected)
        # ...and the pipeline can start a new run from it.
        run_job("trainer.jobs.import_teacher", tmp_path / f"again-{which}", *OVERRIDES, "teacher.source=import",
                f"teacher.import_path={out}", nproc=1, config=None)
        again, _ = load_exported(tmp_path / f"again-{which}" / "teacher" / "export", "raw")
        assert all(torch.equal(again[k], expected[k]) for k in expected)


def test_missing_round_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "tools/export_mdlm.py", "--run-dir", str(tmp_path), "--round", "3"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "round 3's student" in proc.stderr and "round_3" in proc.stderr
