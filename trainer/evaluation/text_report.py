"""The text part of the pipeline's report, and the run's TensorBoard hparams summary.

Reads the evaluations' metrics.json (written by trainer.jobs.evaluate; text runs carry the fields of
trainer/evaluation/text.py) and gives: a markdown section (retokenised gen-PPL, entropy and MAUVE per
model and step count, the likelihood bound per model), and the final metrics an hparams summary shows
(each model at its own step count).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from trainer.config import RunConfig
from trainer.evaluation.sweep import format_table

TEXT_KEYS = ("model", "round", "steps", "temperature", "sampler", "gen_ppl", "entropy", "mauve", "judge_tokens",
             "samples")


def _evals(run_dir: Path, rounds: int, control: bool) -> list[dict]:
    paths = [run_dir / "teacher" / "eval" / "metrics.json"]
    paths += [run_dir / f"round_{r}" / "eval" / "metrics.json" for r in range(1, rounds + 1)]
    if control:
        paths.append(run_dir / "control" / "eval" / "metrics.json")
    return [json.loads(p.read_text()) for p in paths if p.is_file()]


def markdown_section(run_dir: Path, rounds: int, control: bool = False) -> str:
    """'' for a synthetic run; else the text protocol's tables."""
    evals = [ev for ev in _evals(run_dir, rounds, control) if "elbo_nll" in ev]
    if not evals:
        return ""
    judge = evals[0].get("judge") or "none (eval.judge unset: no gen-PPL, no MAUVE)"
    rows = [{k: row.get(k) for k in TEXT_KEYS} for ev in evals for row in ev["rows"]]
    own = [{k: row.get(k) for k in TEXT_KEYS} for ev in evals for row in ev["rows"]
           if row["steps"] == ev["round_steps"]]
    bound = [{"model": ev["model"], "round": ev["round"], "elbo_nll": ev["elbo_nll"], "elbo_nll_se": ev["elbo_nll_se"],
              "elbo_ppl": ev["elbo_ppl"], "rows": ev["elbo_rows"]} for ev in evals]
    return "\n".join([
        "## Text, in the field's protocol", "",
        f"Judge: {judge}; tokenizer {evals[0].get('tokenizer')}. gen-PPL: samples decoded, retokenised with the "
        "judge's tokenizer, scored up to their first EOS; entropy: of each sample's token histogram (nats); "
        f"MAUVE: continuations of the first {evals[0].get('prefix_tokens')} tokens of held-out rows against "
        "the held-out continuations, judge features (trainer/evaluation/text.py).", "",
        "### Each model at its own step count", "", "```",
        format_table(own, TEXT_KEYS), "```", "",
        "### Likelihood bound on held-out rows (MDLM's ELBO, nats/token)", "", "```",
        format_table(bound, ("model", "round", "elbo_nll", "elbo_nll_se", "elbo_ppl", "rows")), "```", "",
        "### Every step count", "", "```", format_table(rows, TEXT_KEYS), "```", ""])


def final_metrics(run_dir: Path, rounds: int, control: bool = False) -> dict[str, float]:
    """Each model at its own step count: ``final/<model>/<measure>`` (model = teacher, round_r, control)."""
    out: dict[str, float] = {}
    for ev in _evals(run_dir, rounds, control):
        name = "teacher" if ev["round"] == 0 and ev["model"] == "teacher" else \
            "control" if ev["model"] == "control" else f"round_{ev['round']}"
        for row in ev["rows"]:
            if row["steps"] != ev["round_steps"]:
                continue
            for key in ("nll", "gen_ppl", "entropy", "mauve", "bigram_kl"):
                if row.get(key) is not None:
                    out[f"final/{name}/{key}"] = float(row[key])
        if ev.get("elbo_nll") is not None:
            out[f"final/{name}/elbo_nll"] = float(ev["elbo_nll"])
    return out


def hparams(cfg: RunConfig) -> dict[str, float | int | str | bool]:
    """The run's settings as flat scalars (TensorBoard hparams accept numbers, strings, bools)."""
    flat: dict[str, float | int | str | bool] = {}
    for section in ("model", "data", "optim", "engine", "train", "targets", "distill", "eval", "teacher"):
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            if isinstance(value, (int, float, str, bool)):
                flat[f"{section}.{key}"] = value
            elif isinstance(value, list):
                flat[f"{section}.{key}"] = str(value)
    flat["name"] = cfg.name
    return flat
