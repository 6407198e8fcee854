"""The teacher as a contender: where the held-out rows carry a `teacher` (data/teacher.py, a larger model's
logged answer), its answers are scored as they were logged, with the same metrics against the rows' targets,
and the verdict says whether the student (the tuned model) can stand in for it.

A row's target is the teacher's own answer unless an expectation replaced it. Against its own answers the
teacher agrees with itself (1.0): there the figure is how well each contender agrees with the teacher's
answers (eval/<contender>/teacher_<metric>). On the rows whose target is an expectation, the teacher and the
others are scored against the expectations (eval/<contender>/expected_<metric>, over eval/n_expected rows),
and the per-example column `teacher_expected` (1 on those rows) lets the verdict pair the student with the
teacher there.
"""

from __future__ import annotations

from mlflow_finetune_plugin.metrics import (
    AGREEMENT_METRICS,
    AGREES_WITH_EXPECTED,
    AGREES_WITH_TEACHER,
    ALTERNATIVE_LABELS,
    ALTERNATIVES,
    TEACHER,
    VERDICT_MIN_EXAMPLES,
    score,
)

EXPECTED_COLUMN = f"{TEACHER}_expected"  # per-example: 1.0 where the row's target is an expectation


def complete(teachers: list[dict | None]) -> bool:
    """Whether every scored row has a teacher (a teacher scored on some rows only would not be comparable)."""
    return bool(teachers) and all(t is not None for t in teachers)


def score_teacher(teachers: list[dict], references: list[str], cfg, train_answers: frozenset[str]
                  ) -> tuple[list[str], dict[str, float], dict[str, list[float]]]:
    """(answers, metric -> value, metric -> per-example values) of the teacher: its logged answers scored as
    the other contenders' are, without `loss` and `perplexity` (no log-probabilities of the references here),
    with its cost figures from the rows (`cost.teacher_costs`)."""
    from mlflow_finetune_plugin.evaluate.cost import teacher_costs
    from mlflow_finetune_plugin.evaluate.scoring import contender_metrics

    answers = [t["answer"] for t in teachers]
    totals, per_example = contender_metrics(answers, references, 0.0, 0, cfg, train_answers)
    totals = {k: v for k, v in totals.items() if k not in ("loss", "perplexity")}
    return answers, {**totals, **teacher_costs(teachers, cfg.teacher_params)}, per_example


def agreement_metrics(rows: list[dict], contenders: list[str], teachers: list[dict],
                      references: list[str]) -> dict[str, float]:
    """Every contender's agreement with the teacher's answers, and, on the rows whose target is an
    expectation, with the expectations (see the module's note); marks those rows in `rows`."""
    answers = [t["answer"] for t in teachers]
    expected = [i for i, (a, r) in enumerate(zip(answers, references)) if _same(a) != _same(r)]
    for i, row in enumerate(rows):
        row[EXPECTED_COLUMN] = float(i in expected)
    out = {"eval/n_expected": float(len(expected))}
    for name in contenders:
        theirs = [row[f"{name}_answer"] for row in rows]
        if name != TEACHER:
            totals, _ = score(theirs, answers)
            out.update({f"eval/{name}/{AGREES_WITH_TEACHER}{m}": totals[m] for m in AGREEMENT_METRICS
                        if m in totals})
        if expected:
            totals, _ = score([theirs[i] for i in expected], [references[i] for i in expected])
            out.update({f"eval/{name}/{AGREES_WITH_EXPECTED}{m}": totals[m] for m in AGREEMENT_METRICS
                        if m in totals})
    return out


def teacher_sentence(metrics: dict[str, float], scores: dict, metric: str, bootstrap) -> str | None:
    """Whether the student can stand in for the teacher, and at what cost; None without a teacher contender.

    With expectations, the student's share of the teacher's score against them and a paired bootstrap of
    (student - teacher) on those rows; without, how well the student agrees with the teacher's answers beside
    the best prompt-only alternative. Then the tokens, parameters and speed against the teacher's, where
    known. `bootstrap`: the verdict's paired bootstrap ((student, teacher) scores -> 95% interval of the
    difference)."""

    def get(c, m):
        return metrics.get(f"eval/{c}/{m}")

    if not any(k.startswith(f"eval/{TEACHER}/") for k in metrics) or get("tuned", "answer_tokens") is None:
        return None
    metric = metric if metric in AGREEMENT_METRICS else "rougeL"
    n_expected = int(metrics.get("eval/n_expected") or 0)
    student, teacher = get("tuned", AGREES_WITH_EXPECTED + metric), get(TEACHER,
                                                                        AGREES_WITH_EXPECTED + metric)
    if n_expected and student is not None and teacher is not None:
        kept = f"{student / teacher:.0%}" if teacher else "n/a"
        said = (
            f"the student keeps {kept} of the teacher's {metric} against the expectations ({student:.2f} vs "
            f"{teacher:.2f} on {n_expected} rows, {_judgement(scores, metric, bootstrap)})")
    else:
        agrees = get("tuned", AGREES_WITH_TEACHER + metric)
        best = max((c for c in ALTERNATIVES if get(c, AGREES_WITH_TEACHER + metric) is not None),
                   key=lambda c: get(c, AGREES_WITH_TEACHER + metric), default=None)
        rival = (f" ({ALTERNATIVE_LABELS[best]} of its base: {get(best, AGREES_WITH_TEACHER + metric):.2f})"
                 if best else "")
        said = (
            f"no expectations to judge either by; the student agrees with the teacher's answers at {metric} "
            f"{agrees:.2f}{rival}")
    return f"Student vs teacher: {said}{_savings(get)}."


def _judgement(scores: dict, metric: str, bootstrap) -> str:
    """Whether the student is below the teacher on the expectation rows beyond the evaluation's noise."""
    mask = (scores.get(TEACHER) or {}).get("expected") or []
    pairs = [(s, t) for s, t, e in zip((scores.get("tuned") or {}).get(metric) or [],
                                        (scores.get(TEACHER) or {}).get(metric) or [], mask)
             if e and s is not None and t is not None]
    if len(pairs) < VERDICT_MIN_EXAMPLES:
        return f"too few to tell whether it can replace the teacher: at least {VERDICT_MIN_EXAMPLES} needed"
    low, high = bootstrap([s for s, _ in pairs], [t for _, t in pairs])
    interval = f"95% interval of the difference {low:+.2f} to {high:+.2f}"
    if high < 0:
        return f"below the teacher beyond the evaluation's noise: {interval}"
    return f"{'above' if low > 0 else 'within the noise of'} the teacher: {interval}"


def _savings(get) -> str:
    """The student's tokens per answer, parameters and speed against the teacher's, each only where both are
    known; what is not known is said, not guessed."""
    known, unknown = [], []
    mine = [get("tuned", m) for m in ("prompt_tokens", "answer_tokens")]
    theirs = [get(TEACHER, m) for m in ("prompt_tokens", "answer_tokens")]
    if None not in theirs:
        known.append(f"{sum(mine):.0f} tokens per answer vs {sum(theirs):.0f} (the teacher's own tokenizer)")
    else:
        unknown.append("the teacher's token usage")
    if get(TEACHER, "params") and get("tuned", "params"):
        known.append(f"{get('tuned', 'params') / get(TEACHER, 'params'):.2g}x the parameters")
    else:
        unknown.append("the teacher's parameters (eval.teacher_params gives them)")
    if get(TEACHER, "tokens_per_s") and get("tuned", "tokens_per_s"):
        known.append(
            f"{get('tuned', 'tokens_per_s') / get(TEACHER, 'tokens_per_s'):.2g}x the tokens/s (the student "
            "timed here, the teacher as logged)")
    else:
        unknown.append("the teacher's speed")
    said = f"; at {', '.join(known)}" if known else ""
    return said + (f"; not known: {', '.join(unknown)}" if unknown else "")


def _same(text: str) -> str:
    return " ".join(text.split())
