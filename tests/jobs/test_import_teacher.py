"""The import_teacher job: a published-layout MDLM directory becomes the pipeline's teacher export."""
import torch

from tests.helpers import (
    COND,
    HEADS,
    LAYERS,
    LENGTH,
    V1,
    D,
    hf_config,
    mdlm_state_dict,
    run_job,
    sdtt_hydra_config,
    write_checkpoint,
)
from trainer.model.dit import DiT
from trainer.runtime.checkpoint import load_exported

SHAPE = [f"model.vocab_size={V1 - 1}", f"model.d_model={D}", f"model.n_layers={LAYERS}", f"model.n_heads={HEADS}",
         f"model.cond_dim={COND}", f"model.max_seq_len={LENGTH}", "data.seq_len=24", "data.synthetic.vocab_size=40",
         "targets.k=8", "distill.start_steps=128"]


def test_imported_teacher_is_exported_in_the_pipeline_format(tmp_path):
    src = write_checkpoint(tmp_path / "mdlm-owt", mdlm_state_dict(), config=hf_config())
    run = tmp_path / "run"
    run_job("trainer.jobs.import_teacher", run, *SHAPE, "teacher.source=import", f"teacher.import_path={src}",
            nproc=1, config=None)
    for which in ("raw", "ema"):
        state, cfg = load_exported(run / "teacher" / "export", which)
        model = DiT(cfg.model)
        model.load_state_dict(state)
        assert torch.equal(state["blocks.1.attn_qkv.weight"], mdlm_state_dict()["blocks.1.attn_qkv.weight"])


def test_shape_mismatch_is_refused_naming_the_key(tmp_path):
    src = write_checkpoint(tmp_path / "mdlm-owt", mdlm_state_dict(), config=hf_config())
    wrong = [s.replace(f"model.d_model={D}", "model.d_model=64") for s in SHAPE]
    proc = run_job("trainer.jobs.import_teacher", tmp_path / "run", *wrong, "teacher.source=import",
                   f"teacher.import_path={src}", nproc=1, config=None, check=False)
    assert proc.returncode == 2 and "vocab_embed.embedding" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "teacher" / "export").exists()


def test_an_sdtt_published_student_becomes_the_teacher(tmp_path):
    """SDTT's MultiRoundSDTT dump of a student distilled from the hub's mdlm-owt (backbone.backbone.* keys,
    its Hydra config.json; tests/unit/test_mdlm_import.py states the layout) through the real job."""
    sd = mdlm_state_dict(seed=7)
    src = write_checkpoint(tmp_path / "sdtt-kld-7", sd, prefix="backbone.backbone.", config=sdtt_hydra_config())
    run = tmp_path / "run"
    run_job("trainer.jobs.import_teacher", run, *SHAPE, "teacher.source=import", f"teacher.import_path={src}",
            nproc=1, config=None)
    state, _ = load_exported(run / "teacher" / "export", "raw")
    assert all(torch.equal(state[k], sd[k]) for k in state) and set(state) == set(sd) - {"rotary_emb.inv_freq"}
