"""Export a run's teacher or student in the published MDLM layout (as kuleshov-group/mdlm-owt).

    python tools/export_mdlm.py --run-dir RUN --round R [--weights ema|raw] [--out DIR] [--overwrite]
    python tools/export_mdlm.py --run-dir RUN --control

Round 0 is the teacher, round r >= 1 that round's student, ``--control`` the control. The default
destination is ``<export>/../mdlm`` (e.g. ``RUN/round_2/student/mdlm``). The run's export is
verified (sha256 against export.json) before anything is written; the result holds
``model.safetensors`` + ``config.json`` (read back by ``trainer.model.mdlm_import.import_mdlm`` and
by the pipeline's ``teacher.source=import``) and ``sdtt_export.json`` (where it came from).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.layout import CONTROL, RunLayout  # noqa: E402
from trainer.model.mdlm_export import MDLMExportError, export_mdlm  # noqa: E402
from trainer.runtime.checkpoint import WEIGHT_FILES, CheckpointError, load_exported, read_json  # noqa: E402


def source_export(run_dir: Path, round_idx: int, control: bool) -> Path:
    return RunLayout(run_dir).export(CONTROL if control else round_idx)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--round", type=int, default=0, help="0 = the teacher, r >= 1 = round r's student")
    p.add_argument("--control", action="store_true", help="export the control instead of a round")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--out", type=Path, default=None, help="destination folder (default: beside the export)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.round < 0:
        p.error(f"--round {args.round}: must be >= 0")
    src = source_export(args.run_dir, args.round, args.control)
    if not (src / "export.json").is_file():
        what = "the control" if args.control else "the teacher" if args.round == 0 else f"round {args.round}'s student"
        print(f"error: no export of {what} at {src} (export.json missing): has that stage finished?", file=sys.stderr)
        return 2
    out = args.out or src.parent / "mdlm"
    try:
        state, cfg = load_exported(src, args.weights)
        info = read_json(src / "export.json")
        fname = WEIGHT_FILES[args.weights]
        extra = {"run_dir": str(args.run_dir.resolve()), "round": args.round, "control": args.control,
                 "weights": args.weights, "source": str(src.resolve()), "step": info.get("step"),
                 "source_sha256": info["files"][fname]["sha256"]}
        export_mdlm(out, state, cfg.model, overwrite=args.overwrite, extra=extra)
    except (CheckpointError, MDLMExportError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {src} ({args.weights} weights) to {out} in the published MDLM layout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
