"""The report's comparisons, as pure functions of the evaluation rows (trainer/jobs/evaluate.py).

Per round r (the student sampled at its own step count N = start / 2^r; the control is control@r, the
control after round r's update count, where it was evaluated):
- paired NLL differences with their SE: student - teacher and student - control at N steps,
  control - teacher at N (what extra MDLM training alone buys), student at N - teacher at 2N (SDTT's
  own criterion: N/2 steps as good as the teacher's N);
- the share of the teacher's gap closed, (T_N - X_N) / (T_N - T_most), for the student and the control;
- every model's NLL at the data's own entropy, read off its temperature sweep at N (its
  quality-vs-entropy frontier), and the paired differences there: quality at matched diversity, which
  a student that merely sharpens cannot win;
- against the ceiling, when the round's ideal student was evaluated (trainer/evaluation/ideal.py):
  the achieved gain (round teacher - student) over the ideal gain (round teacher - ideal student) at
  N, at temperature 1 and at the data's entropy, with its paired SE and the ideal row's Monte Carlo
  SE. The round's teacher is model r - 1 (the teacher for r = 1, student r - 1 after).
Every number carries a standard error (trainer/evaluation/paired.py). None where a row is missing.
"NLL" is the exact NLL per token under a synthetic source, or for text the judge's NLL per scored
token (log gen-PPL, ``paired.sample_nll``): the same comparisons in either unit.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from trainer.config import PLAIN_SAMPLER as PLAIN
from trainer.evaluation import paired
from trainer.evaluation.paired import Est


def _key(row: dict) -> tuple:
    return row["model"], row["round"], row["steps"], float(row.get("temperature") or 1.0)


def _sampler(row: dict) -> str:
    return row.get("sampler") or PLAIN  # rows written before eval.samplers existed: the plain sampler


def index_rows(rows: Sequence[dict], sampler: str = PLAIN) -> dict[tuple, dict]:
    """(model, round, steps, temperature) -> row of ``sampler`` (default: each model's own, ``sampling.*``);
    rows without a per-sample quality are left out."""
    return {_key(r): r for r in rows if paired.has_sample_nll(r) and _sampler(r) == sampler}


def _nll(idx: dict, model: str, rnd: int, steps: int | None) -> Est | None:
    row = idx.get((model, rnd, steps, 1.0)) if steps is not None else None
    return paired.sample_nll(row) if row is not None else None


def _sweep(idx: dict, model: str, rnd: int, steps: int) -> list[dict]:
    return [r for k, r in idx.items() if k[0] == model and k[1] == rnd and k[2] == steps]


def _d(e: Est | None) -> dict | None:
    return e.as_dict() if e is not None else None


def _diff(a: Est | None, b: Est | None) -> dict | None:
    return (a - b).as_dict() if a is not None and b is not None else None


def _resolved(e: Est, z: float = 2.0) -> bool:
    """The estimate is at least ``z`` standard errors from 0 (False when its SE is undefined)."""
    return math.isfinite(e.se) and abs(e.value) >= z * e.se


def at_entropy(idx: dict, model: str, rnd: int, steps: int, target: float | None) -> paired.AtEntropy | None:
    """The model's NLL at entropy ``target`` from its temperature sweep at ``steps`` (None: no sweep)."""
    if target is None:
        return None
    pts = _sweep(idx, model, rnd, steps)
    return paired.nll_at_entropy(paired.frontier(pts), target) if len(pts) >= 2 else None


def compare_round(rows: Sequence[dict], rnd: int, steps: int, target_entropy: float | None,
                  control_round: int | None = None) -> dict:
    """Every comparison of round ``rnd``'s student at its ``steps`` (see the module docstring).
    ``control_round``: the last round the control was evaluated at (its whole budget). The control
    compared with round r is control@r (evaluated with ``--control --round r``: r x steps_per_round
    updates, the student's count) when its rows exist, else that last one (``control_matched`` False)."""
    idx = index_rows(rows)
    if control_round is not None and any(k[0] == "control" and k[1] == rnd for k in idx):
        control_round = rnd
    teacher_steps = sorted(k[2] for k in idx if k[0] == "teacher" and k[3] == 1.0)
    most = teacher_steps[-1] if teacher_steps else None
    t_n, s_n = _nll(idx, "teacher", 0, steps), _nll(idx, "student", rnd, steps)
    c_n = _nll(idx, "control", control_round, steps) if control_round is not None else None
    t_2n, t_most = _nll(idx, "teacher", 0, 2 * steps), _nll(idx, "teacher", 0, most)
    out: dict = {"round": rnd, "steps": steps, "teacher_most_steps": most, "control_round": control_round,
                 "control_matched": control_round is None or control_round == rnd,
                 "teacher_nll": _d(t_n), "student_nll": _d(s_n), "control_nll": _d(c_n),
                 "teacher_2n_nll": _d(t_2n),
                 "student_minus_teacher": _diff(s_n, t_n), "student_minus_control": _diff(s_n, c_n),
                 "control_minus_teacher": _diff(c_n, t_n), "student_minus_teacher_2n": _diff(s_n, t_2n)}
    # A share of the teacher's gap is only defined when that gap is measurably non-zero (2 paired SE):
    # a near-zero denominator turns sampling noise into shares of hundreds of percent.
    gap_ok = t_n is not None and t_most is not None and most != steps and _resolved(t_n - t_most)
    out["gap_closed_student"] = (paired.gap_closed(t_n, s_n, t_most).as_dict()
                                 if gap_ok and s_n is not None else None)
    out["gap_closed_control"] = (paired.gap_closed(t_n, c_n, t_most).as_dict()
                                 if gap_ok and c_n is not None else None)
    models = (("teacher", "teacher", 0), ("student", "student", rnd), ("control", "control", control_round))
    for name, model, r in models:
        row = idx.get((model, r, steps, 1.0))
        out[f"{name}_entropy"] = row.get("entropy") if row else None
        out[f"{name}_bigram_kl"] = row.get("bigram_kl") if row else None
        # Free of the leak constant (trainer/evaluation/quality.py support_split): value and SE.
        for key in ("invalid_rate", "valid_nll"):
            out[f"{name}_{key}"] = ({"value": row[key], "se": row.get(f"{key}_se")}
                                    if row and row.get(key) is not None else None)
    ats = {name: (at_entropy(idx, model, r, steps, target_entropy) if r is not None else None)
           for name, model, r in models}
    for name, a in ats.items():
        out[f"{name}_nll_at_H"] = ({**a.est.as_dict(), "extrapolated": a.extrapolated} if a is not None else None)

    def at_diff(x: str, y: str) -> dict | None:
        a, b = ats[x], ats[y]
        if a is None or b is None:
            return None
        return {**(a.est - b.est).as_dict(), "extrapolated": a.extrapolated or b.extrapolated}

    out["student_minus_teacher_at_H"] = at_diff("student", "teacher")
    out["student_minus_control_at_H"] = at_diff("student", "control")
    out["control_minus_teacher_at_H"] = at_diff("control", "teacher")
    out.update(against_ideal(idx, rnd, steps, target_entropy))
    return out


def _ideal_ratio(teacher: Est, student: Est, ideal: Est, ideal_mc_se: float | None) -> dict | None:
    """(T - S) / (T - I) with its paired SE, and the Monte Carlo SE the ideal row adds (d/dI =
    ratio / (T - I)); None when the ideal gain is within 2 SE of 0 (the share would be noise)."""
    gain = teacher - ideal
    if not _resolved(gain):
        return None
    r = paired.ratio(teacher - student, gain)
    mc = abs(r.value / gain.value) * ideal_mc_se if ideal_mc_se is not None else None
    return {**r.as_dict(), "mc_se": round(mc, 6) if mc is not None else None}


def _mc_se_at_entropy(rows: list[dict], target: float) -> float | None:
    """The Monte Carlo SE of the ideal student's read at entropy ``target``: the same read on each
    rollout set's (entropy, NLL) means (``nll_repeats``, ``entropy_repeats``), SD over sets / sqrt(K)."""
    if not rows or any(r.get("nll_repeats") is None or r.get("entropy_repeats") is None for r in rows):
        return None
    k = len(rows[0]["nll_repeats"])
    one = np.zeros(1)
    reads = []
    for j in range(k):
        f = paired.Frontier([float(r["temperature"]) for r in rows],
                            [Est(float(r["entropy_repeats"][j]), one) for r in rows],
                            [Est(float(r["nll_repeats"][j]), one) for r in rows])
        order = np.argsort([e.value for e in f.entropy])
        f = paired.Frontier([f.temperatures[i] for i in order], [f.entropy[i] for i in order],
                            [f.nll[i] for i in order])
        a = paired.nll_at_entropy(f, target)
        if a is None:
            return None
        reads.append(a.est.value)
    return float(np.std(reads, ddof=1) / math.sqrt(k)) if k > 1 else None


def against_ideal(idx: dict, rnd: int, steps: int, target_entropy: float | None) -> dict:
    """Round ``rnd``'s student against its ideal (see the module docstring); {} when the ideal
    student of the round was not evaluated."""
    ideal_row = idx.get(("ideal", rnd, steps, 1.0))
    if ideal_row is None:
        return {}
    teacher = ("teacher", 0) if rnd == 1 else ("student", rnd - 1)
    t_n, s_n, i_n = _nll(idx, *teacher, steps), _nll(idx, "student", rnd, steps), paired.sample_nll(ideal_row)
    out: dict = {"round_teacher": "teacher" if rnd == 1 else f"student r{rnd - 1}",
                 "ideal_nll": {**i_n.as_dict(), "mc_se": ideal_row.get("nll_mc_se")},
                 "ideal_entropy": ideal_row.get("entropy"), "ideal_bigram_kl": ideal_row.get("bigram_kl"),
                 "round_teacher_nll": _d(t_n), "ideal_gain": _diff(t_n, i_n), "achieved_gain": _diff(t_n, s_n),
                 "achieved_over_ideal": (_ideal_ratio(t_n, s_n, i_n, ideal_row.get("nll_mc_se"))
                                         if t_n is not None and s_n is not None else None)}
    a_t, a_s, a_i = (at_entropy(idx, m, r, steps, target_entropy)
                     for m, r in (teacher, ("student", rnd), ("ideal", rnd)))
    mc_h = _mc_se_at_entropy(_sweep(idx, "ideal", rnd, steps), target_entropy) if a_i is not None else None
    out["ideal_nll_at_H"] = ({**a_i.est.as_dict(), "mc_se": mc_h, "extrapolated": a_i.extrapolated}
                             if a_i is not None else None)
    out["round_teacher_nll_at_H"] = ({**a_t.est.as_dict(), "extrapolated": a_t.extrapolated}
                                     if a_t is not None else None)
    ok = a_t is not None and a_s is not None and a_i is not None
    ratio_h = _ideal_ratio(a_t.est, a_s.est, a_i.est, mc_h) if ok else None
    out["achieved_over_ideal_at_H"] = ({**ratio_h, "extrapolated": a_t.extrapolated or a_s.extrapolated
                                        or a_i.extrapolated} if ratio_h is not None else None)
    out["ideal_gain_at_H"] = ({**(a_t.est - a_i.est).as_dict(), "extrapolated": a_t.extrapolated or a_i.extrapolated}
                              if a_t is not None and a_i is not None else None)
    return out


def compare_all(rows: Sequence[dict], round_steps: dict[int, int], target_entropy: float | None,
                control_round: int | None) -> list[dict]:
    """``compare_round`` for every round r >= 1 of ``round_steps`` (round -> its step count)."""
    return [compare_round(rows, r, n, target_entropy, control_round) for r, n in sorted(round_steps.items()) if r >= 1]


def compare_samplers(rows: Sequence[dict], rnd: int, steps: int, target_entropy: float | None) -> dict | None:
    """Round ``rnd``'s student at its ``steps`` against the teacher's training-free samplers there
    (``eval.samplers``, and the plain one): each sampler's NLL at temperature 1 and at the data's
    entropy, the best of them by each measure, and student − best with its paired SE. None when the
    teacher was not evaluated with any named sampler.

    Pairing: at equal steps every sampler draws the same uniforms per sample (trainer/method/sampling.py),
    so student − sampler is a mean of per-sample differences over i.i.d. pairs and its SE is valid for
    every sampler; with confidence-ordered unmasking the positions unmasked depend on the model, so
    the pairs are less correlated and that SE is larger, not wrong. The best sampler is chosen on the
    same samples it is then compared on: a selection that flatters the samplers, i.e. conservative
    for the student.
    """
    names = sorted({_sampler(r) for r in rows if r["model"] == "teacher" and r["steps"] == steps} - {PLAIN})
    if not names:
        return None
    s_idx = index_rows(rows)
    s_1 = _nll(s_idx, "student", rnd, steps)
    s_h = at_entropy(s_idx, "student", rnd, steps, target_entropy)
    per: dict[str, dict] = {}
    ests: dict[str, tuple[Est | None, paired.AtEntropy | None]] = {}
    for name in [PLAIN, *names]:
        idx = index_rows(rows, name)
        e1, eh = _nll(idx, "teacher", 0, steps), at_entropy(idx, "teacher", 0, steps, target_entropy)
        ests[name] = (e1, eh)
        row = idx.get(("teacher", 0, steps, 1.0))
        per[name] = {"nll": _d(e1), "entropy": row.get("entropy") if row else None,
                     "nll_at_H": {**eh.est.as_dict(), "extrapolated": eh.extrapolated} if eh else None,
                     "student_minus": _diff(s_1, e1),
                     "student_minus_at_H": ({**(s_h.est - eh.est).as_dict(),
                                             "extrapolated": s_h.extrapolated or eh.extrapolated}
                                            if s_h is not None and eh is not None else None)}
    at_1 = [n for n in per if ests[n][0] is not None]
    # At the data's entropy the best is chosen among interpolated reads: an extrapolated one is a guess.
    at_h = [n for n in per if ests[n][1] is not None and not ests[n][1].extrapolated]
    best_1 = min(at_1, key=lambda n: ests[n][0].value) if at_1 else None
    best_h = min(at_h, key=lambda n: ests[n][1].est.value) if at_h else None
    return {"round": rnd, "steps": steps, "samplers": per, "best": best_1, "best_at_H": best_h,
            "student_minus_best": per[best_1]["student_minus"] if best_1 else None,
            "student_minus_best_at_H": per[best_h]["student_minus_at_H"] if best_h else None,
            "best_minus_plain_at_H": ({**(ests[best_h][1].est - ests[PLAIN][1].est).as_dict(), "extrapolated": False}
                                      if best_h and ests[PLAIN][1] is not None and not ests[PLAIN][1].extrapolated
                                      else None)}


HEADLINE = ("student_minus_teacher", "student_minus_control", "control_minus_teacher", "student_minus_teacher_2n",
            "gap_closed_student", "gap_closed_control", "teacher_nll_at_H", "student_nll_at_H", "control_nll_at_H",
            "student_minus_teacher_at_H", "student_minus_control_at_H", "control_minus_teacher_at_H")
# Against the ceiling (present only when the round's ideal student was evaluated).
IDEAL_HEADLINE = ("ideal_nll", "ideal_gain", "achieved_gain", "achieved_over_ideal", "ideal_nll_at_H",
                  "ideal_gain_at_H", "achieved_over_ideal_at_H")


def summary(comparisons: Sequence[dict]) -> dict[str, float | None]:
    """Flat scalars for aggregation over seeds (tools/seeds.py): ``r<round>/<measure>`` -> value,
    plus the plain NLL and entropy of each model at the round's count."""
    out: dict[str, float | None] = {}
    for c in comparisons:
        p = f"r{c['round']}"
        for key in HEADLINE + tuple(k for k in IDEAL_HEADLINE if k in c):
            v = c.get(key)
            out[f"{p}/{key}"] = v.get("value") if isinstance(v, dict) else None
            if key.endswith("_at_H"):  # 1.0: read by extrapolation beyond the sweep (seeds.md marks it)
                out[f"{p}/{key}_extrapolated"] = (float(bool(v.get("extrapolated"))) if isinstance(v, dict)
                                                  else None)
        for name in ("teacher", "student", "control"):
            v = c.get(f"{name}_nll")
            out[f"{p}/{name}_nll"] = v.get("value") if isinstance(v, dict) else None
            out[f"{p}/{name}_entropy"] = c.get(f"{name}_entropy")
            out[f"{p}/{name}_bigram_kl"] = c.get(f"{name}_bigram_kl")
            for key in ("invalid_rate", "valid_nll"):
                v = c.get(f"{name}_{key}")
                out[f"{p}/{name}_{key}"] = v.get("value") if isinstance(v, dict) else None
    return out


def sampler_summary(sampler_comparisons: Sequence[dict]) -> dict[str, float | None]:
    """Flat scalars of ``compare_samplers`` for tools/seeds.py: per round, student − best sampler at
    temperature 1 and at the data's entropy, and best − plain at the data's entropy. The best is each
    seed's own, so a mean over seeds may mix samplers (the per-sampler rows are in report.json)."""
    out: dict[str, float | None] = {}
    for c in sampler_comparisons:
        for key in ("student_minus_best", "student_minus_best_at_H", "best_minus_plain_at_H"):
            v = c.get(key)
            out[f"r{c['round']}/{key}"] = v.get("value") if isinstance(v, dict) else None
            if key.endswith("_at_H"):
                out[f"r{c['round']}/{key}_extrapolated"] = (float(bool(v.get("extrapolated")))
                                                            if isinstance(v, dict) else None)
    return out
