"""Make the exact teacher of the synthetic Markov source the run's teacher (``teacher.source=oracle``).

    python -m trainer.jobs.oracle_teacher --run-dir DIR [--config FILE] [key=value ...]

Nothing is trained: the Bayes-optimal denoiser p(x_i | visible tokens) has a closed form for a
first-order chain (trainer/model/oracle.py). The job writes ``<run>/teacher/export`` in the format
every later stage loads, with export.json's ``model`` = ``markov_oracle`` and the chain's transition
matrix and stationary law (float64) as both the raw and the EMA "weights"; config.yaml records the
source's parameters (``data.synthetic``). The targets job, the online distill source and the
evaluation then load it like a trained teacher (``runtime.checkpoint.load_model``). Round 1's student
and the control start from ``teacher.init_from`` or a seeded random init (trainer/distill/rounds.py).
"""
from __future__ import annotations

import logging

import torch

from trainer.config import ConfigError
from trainer.data.synthetic import MarkovSource
from trainer.jobs import common
from trainer.layout import RunLayout
from trainer.model.oracle import KIND, MarkovOracle
from trainer.runtime.checkpoint import export_weights

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

    # ---- export -----------------------------------------------------------------------------------
    state = oracle.state_dict()
    out = export_weights(RunLayout(args.run_dir).export(0), state, state, cfg, step=0, overwrite=True, kind=KIND)
    log.info("exact teacher of the Markov source (V=%d, seed %d, entropy rate %.4f nats/token) written to %s",
             source.vocab_size, cfg.data.synthetic.seed, source.entropy_rate, out)


if __name__ == "__main__":
    common.entry(main)
