"""Bring an existing MDLM teacher into the pipeline instead of pretraining one.

    python -m trainer.jobs.import_teacher --run-dir DIR teacher.import_path=/path/to/mdlm-owt

Reads a local directory in the published MDLM layout (safetensors only) and writes the teacher's
export (``<run>/teacher/export``), the same format pretraining ends with, so every later stage is
the same whichever way the teacher came. The imported weights serve as both raw and EMA weights.
"""
from __future__ import annotations

import dataclasses
import logging

from trainer.config import ConfigError
from trainer.jobs import common
from trainer.layout import RunLayout
from trainer.model.dit import count_parameters
from trainer.model.mdlm_import import import_mdlm
from trainer.runtime.checkpoint import export_weights

log = logging.getLogger("sdtt")


def main(argv=None) -> None:
    common.setup_logging()
    args = common.parse_args(__doc__.splitlines()[1], argv=argv)
    cfg = common.run_config(args, write=True)
    if not cfg.teacher.import_path:
        raise ConfigError("bad config key 'teacher.import_path': set it to a local MDLM directory")
    model, model_cfg = import_mdlm(cfg.teacher.import_path, cfg.model)
    if model_cfg != cfg.model:
        # The checkpoint decides the shape; keep the run's non-shape settings (dropout, rope base).
        cfg = dataclasses.replace(cfg, model=model_cfg)
    state = model.state_dict()
    out = export_weights(RunLayout(args.run_dir).export(0), state, state, cfg, step=0)
    log.info("imported %s (%d parameters) into %s", cfg.teacher.import_path, count_parameters(model), out)


if __name__ == "__main__":
    common.entry(main)
