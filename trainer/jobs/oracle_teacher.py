"""Make the exact teacher of the synthetic Markov source the run's teacher (``teacher.source=oracle``).

    python -m trainer.jobs.oracle_teacher --run-dir DIR [--config FILE] [key=value ...]

Nothing is trained: the Bayes-optimal denoiser p(x_i | visible tokens) has a closed form for a
first-order chain (trainer/model/oracle.py). The job writes ``<run>/teacher/export`` in the format
every later stage loads, with export.json's ``model`` = ``markov_oracle`` and the chain's transition
matrix and stationary law (float64) as both the raw and the EMA "weights"; config.yaml records the
source's parameters (``data.synthetic``). The targets job, the online distill source and the
evaluation then load it like a trained teacher (``runtime.checkpoint.load_model``). Round 1's student
and the control start from ``teacher.init_from`` or a seeded random init (trainer/distill/rounds.py).

It also scores the exact teacher's MDLM validation bound on the held-out split, with the noise a
pretrained teacher's ``val/nll`` uses (``evaluation.validation.validate``): the lowest bound any
denoiser reaches in expectation, to read a trained teacher's against: with the same rows, t and
masks, the difference is paired. It is a one-draw estimate per row (its noise can put it below the
rows' own NLL); only its expectation bounds the NLL. Logged and written to the teacher's metrics
(``val/nll`` at step 0) and to ``<run>/teacher/oracle.json`` beside the source's floor.
"""
from __future__ import annotations

import logging

import torch

from trainer.config import ConfigError
from trainer.data.prepared import data_dir, load_split, prepare_data
from trainer.data.synthetic import MarkovSource
from trainer.evaluation.validation import validate
from trainer.fileio import atomic_write_json
from trainer.jobs import common
from trainer.layout import RunLayout
from trainer.model.oracle import KIND, MarkovOracle
from trainer.runtime.checkpoint import export_weights
from trainer.runtime.metrics import MetricsWriter

log = logging.getLogger("sdtt")


def main(argv=None) -> None:
    common.setup_logging()
    args = common.parse_args(__doc__.splitlines()[1], argv=argv)
    cfg = common.run_config(args, write=True)
    if cfg.teacher.source != "oracle":
        raise ConfigError(f"bad config key 'teacher.source': '{cfg.teacher.source}'; this job writes the exact "
                          "teacher (teacher.source=oracle)")

    # ---- build the exact teacher from the source --------------------------------------------------
    source = MarkovSource(cfg.data.synthetic)
    oracle = MarkovOracle(torch.from_numpy(source.transition_matrix()), torch.from_numpy(source.stationary),
                          cfg.data.seq_len)

    # ---- its validation bound on the held-out split ---------------------------------------------------
    layout = RunLayout(args.run_dir)
    data = data_dir(cfg.data, args.run_dir)
    prepare_data(cfg.data, data)  # a no-op when the prepare stage already ran
    valid = torch.from_numpy(load_split(data, "valid").astype("int64"))
    bound = validate(oracle, valid, cfg, 0, 1)
    floor = source.sequence_entropy_per_token(cfg.data.seq_len)
    with MetricsWriter(layout.metrics(0)) as metrics:
        metrics.scalars(0, {"val/nll": bound})

    # ---- export -----------------------------------------------------------------------------------
    state = oracle.state_dict()
    out = export_weights(layout.export(0), state, state, cfg, step=0, overwrite=True, kind=KIND)
    atomic_write_json(layout.model_dir(0) / "oracle.json",
                      {"val_nll_bound": bound, "nll_floor": floor, "entropy_rate": source.entropy_rate})
    log.info("exact teacher of the Markov source (V=%d, seed %d, entropy rate %.4f nats/token) written to %s; its "
             "validation bound %.4f nats/token (the source's floor %.4f)", source.vocab_size,
             cfg.data.synthetic.seed, source.entropy_rate, out, bound, floor)


if __name__ == "__main__":
    common.entry(main)
