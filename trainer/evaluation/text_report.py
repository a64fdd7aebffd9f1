"""The text part of the pipeline's report, and the run's TensorBoard hparams summary.

Reads the evaluations' metrics.json (written by trainer.jobs.evaluate; text runs carry the fields of
trainer/evaluation/text.py) and gives: a markdown section (gen-PPL under its named protocol, both
entropies and MAUVE per model and step count, the likelihood bound and LAMBADA per model), and the
final metrics an hparams summary shows (each model at its own step count).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from trainer.config import RunConfig
from trainer.evaluation import metrics
from trainer.evaluation.report import load_evals
from trainer.evaluation.sweep import format_table

# What each gen-PPL protocol scores (trainer/evaluation/protocols.py), for the report's reader.
GEN_PPL_WORDS = {
    "mdlm": "MDLM's and Duo's tokens (every non-EOS token of the whole retokenised sample and its first EOS, "
            "positions 1..T-1), per token over all samples",
    "sdtt": "SDTT's tokens (every position 1..T-1 of the sample), each sample's mean NLL then the mean",
    "first_doc": "the retokenised sample up to and including its first EOS (this project's earlier "
                 "rule; not the field's)",
}
MAUVE_WORDS = {
    "heldout": "continuations of the first {p} tokens of held-out rows against the held-out continuations "
               "(prefix removed), one MAUVE seed",
    "sdtt": "SDTT's protocol: {p}-token prompts from eval.mauve_prompts, continuations per prompt, the prompt "
            "included, mean and std over MAUVE seeds",
}


def _evals(run_dir: Path, rounds: int, control: bool) -> list[dict]:
    """The evaluations that exist of the teacher, each round's student and the final control (not
    control@r: its match is in the report's comparisons)."""
    return load_evals(run_dir, rounds, control, matched=False, missing_ok=True)


def markdown_section(run_dir: Path, rounds: int, control: bool = False) -> str:
    """'' for a synthetic run; else the text protocol's tables."""
    evals = [ev for ev in _evals(run_dir, rounds, control) if "elbo_nll" in ev]
    if not evals:
        return ""
    first = evals[0]
    judge = first.get("judge") or "none (eval.judge unset: no gen-PPL, no MAUVE)"
    protocol = first.get("gen_protocol") or "first_doc"  # evaluations written before the key scored first_doc
    mauve = MAUVE_WORDS[first.get("mauve_protocol") or "heldout"].format(p=first.get("prefix_tokens"))
    keys = metrics.columns(metrics.TEXT_TABLE)
    rows = [{k: row.get(k) for k in keys} for ev in evals for row in ev["rows"]]
    own = [{k: row.get(k) for k in keys} for ev in evals for row in ev["rows"] if row["steps"] == ev["round_steps"]]
    per_eval = metrics.in_view(metrics.BOUND)  # headed by their ``header`` (elbo_rows: "rows")
    bound_keys = ("model", "round", *(m.header or m.name for m in per_eval))
    bound = [{"model": ev["model"], "round": ev["round"], **{m.header or m.name: ev.get(m.name) for m in per_eval}}
             for ev in evals]
    return "\n".join([
        "## Text, in the field's protocol", "",
        f"Judge: {judge}; tokenizer {first.get('tokenizer')}. gen-PPL (protocol `{protocol}`): samples decoded "
        f"and scored by the judge on {GEN_PPL_WORDS[protocol]}; entropy: of each whole sample's token histogram "
        "(nats, the field's); gen_entropy: the same over the tokens gen-PPL scored; "
        f"MAUVE (features: {first.get('mauve_features') or judge}): {mauve} (trainer/evaluation/text.py).", "",
        "### Each model at its own step count", "", "```",
        format_table(own, keys), "```", "",
        "### Likelihood bound on held-out rows (MDLM's ELBO, nats/token); LAMBADA as SDTT computes it", "",
        "```", format_table(bound, bound_keys), "```", "",
        "### Every step count", "", "```", format_table(rows, keys), "```", ""])


def final_metrics(run_dir: Path, rounds: int, control: bool = False) -> dict[str, float]:
    """Each model at its own step count: ``final/<model>/<measure>`` (model = teacher, round_r, control)."""
    out: dict[str, float] = {}
    for ev in _evals(run_dir, rounds, control):
        name = "teacher" if ev["round"] == 0 and ev["model"] == "teacher" else \
            "control" if ev["model"] == "control" else f"round_{ev['round']}"
        for row in ev["rows"]:
            if row["steps"] != ev["round_steps"]:
                continue
            for key in metrics.names(metrics.FINAL, per_evaluation=False):
                if row.get(key) is not None:
                    out[f"final/{name}/{key}"] = float(row[key])
        for key in metrics.names(metrics.FINAL, per_evaluation=True):
            if ev.get(key) is not None:
                out[f"final/{name}/{key}"] = float(ev[key])
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
