"""Answer-quality metrics through the `evaluate` API, from modules shipped in `assets/metrics/` (loaded by
path).

The hub's metric modules need a network; these small scripts do not (`rouge_score` and `sacrebleu` do the
arithmetic) and every one returns per-example scores too, for the per-example table.
"""

from __future__ import annotations

import functools
from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent / "assets" / "metrics"

# Metric name -> the shipped module that computes it.
TEXT_METRICS = {"exact_match": "exact_match", "token_f1": "token_f1", "rouge1": "rouge", "rouge2": "rouge",
                "rougeL": "rouge", "chrf": "chrf", "bleu": "bleu"}
# Where lower is better; every other metric is better higher. `misrouted` (evaluate/scoring.py): the share of
# answers that are, word for word, the training answer of other questions.
LOWER_IS_BETTER = ("loss", "perplexity", "misrouted", "prompt_tokens", "latency_s", "params")

# Who answers the held-out prompts: metrics are logged as eval/<contender>/<metric>. teacher: the answers the
# held-out rows carry (their `teacher` key: a larger model's logged answers, not generated here); base: the
# base model zero-shot; fewshot: with k random train conversations as shots; retrieval: with the k train
# conversations most similar to the question (BM25); optimized: the instruction and shots a search on a dev
# split of the train rows found best (evaluate/prompt_search.py); tuned: the fine-tuned model; length: a
# reward model's rule-of-thumb rival, "the longer answer wins".
# rag: the base model with the chunks of data.documents most similar to the question in its prompt; tuned-rag:
# the tuned model with them (documents recipes: evaluate/documents.py).
CONTENDERS = ("teacher", "base", "fewshot", "retrieval", "rag", "optimized", "length", "tuned", "tuned-rag")
RAG, TUNED_RAG = "rag", "tuned-rag"
# A documents recipe's second held-out set, questions on documents that never trained:
# eval/unseen/<contender>/<m>.
UNSEEN_PREFIX = "eval/unseen/"
# How often the chunk holding the answer was among the k retrieved: eval/rag/recall_at_k (and under
# UNSEEN_PREFIX).
RECALL = "recall_at_k"
# Documents recipes: the share of a reference's numbers, codes and names an answer says
# (evaluate/scoring.fact_recall).
FACT_RECALL = "fact_recall"
OPTIMIZED = "optimized"
TEACHER = "teacher"
# What an answer costs, per contender, logged as eval/<contender>/<name> beside the quality metrics and shown
# under them: mean prompt tokens (the chat template's rendering, shots included) and answer tokens per answer,
# the median seconds per answer on this machine (evaluate/cost.py says how it is timed), answer tokens per
# second of generation, and the parameters that answered (tuned: the base's plus the adapter's). A teacher's
# come from its rows' `teacher`.
COST_METRICS = ("prompt_tokens", "answer_tokens", "latency_s", "tokens_per_s", "params")
# With a teacher: every contender's agreement with the teacher's answers (eval/<contender>/teacher_<metric>),
# and on the rows whose target is an expectation rather than the teacher's answer, with the expectations
# (eval/<contender>/expected_<metric>, over eval/n_expected rows).
AGREEMENT_METRICS = ("exact_match", "token_f1", "rougeL", "chrf")
AGREES_WITH_TEACHER, AGREES_WITH_EXPECTED = "teacher_", "expected_"
# The prompt-only alternatives to fine-tuning, cheapest first: what the verdict and the default gates weigh it
# against.
ALTERNATIVES = ("base", "fewshot", "retrieval", "rag", "optimized", "length")
# How the verdict names each alternative.
ALTERNATIVE_LABELS = {"base": "zero-shot prompting", "fewshot": "few-shot prompting",
                      "retrieval": "retrieval prompting", "rag": "RAG over the documents",
                      "optimized": "the optimized prompt", "length": "the longer answer winning"}
# Forgetting figures (general-text loss and perplexity, base and tuned) are logged under this prefix.
FORGETTING_PREFIX = "eval/forgetting/"
# The verdict (evaluate/verdict.py): the tuned model's margin over the best alternative and its 95% interval,
# under this prefix (margin, margin_low, margin_high); the interval is a paired bootstrap of this many
# resamples, and no run evaluated on fewer than VERDICT_MIN_EXAMPLES held-out examples is called a pay-off.
VERDICT_PREFIX = "eval/verdict/"
VERDICT_RESAMPLES = 1000
VERDICT_MIN_EXAMPLES = 10
# The least gain over the best prompt-only contender that counts as a pay-off (`eval.min_gain`'s default), on
# the 0-1 scale of the metrics in UNIT_SCALE; docs/methods.md gives the measurements it was chosen by.
DEFAULT_MIN_GAIN = 0.05
# Metrics scored between 0 and 1 per example; any other (`reward`: the weighted sum of a recipe's reward
# functions) has no fixed scale, and `eval.min_gain` reads as a share of the range its per-example scores
# span.
UNIT_SCALE = (*TEXT_METRICS, "json_valid", "misrouted", FACT_RECALL, "pair_accuracy", RECALL)


def metric_path(module: str) -> str:
    """Absolute path of a shipped metric module's folder (what `evaluate.load` is given)."""
    return str(METRICS_DIR / module)


@functools.cache
def load_metric(module: str):
    """`evaluate.load` of a shipped module, by local path; cached per process."""
    import evaluate

    return evaluate.load(metric_path(module), keep_in_memory=True)


def score(predictions: list[str], references: list[str], json_schema: dict | None = None,
          structured: bool = False) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Aggregate scores and per-example scores of `predictions` against `references`, every value in [0,
    1]."""
    totals: dict[str, float] = {}
    per_example: dict[str, list[float]] = {}
    if not predictions:
        return totals, per_example
    outputs = [load_metric(m).compute(predictions=predictions, references=references, per_example=True)
               for m in dict.fromkeys(TEXT_METRICS.values())]
    if structured:
        outputs.append(load_metric("json_valid").compute(predictions=predictions, schema=json_schema,
                                                         per_example=True))
    for out in outputs:
        for key, value in out.items():
            if key.endswith("_per_example"):
                per_example[key.removesuffix("_per_example")] = [float(v) for v in value]
            else:
                totals[key] = float(value)
    return totals, per_example


def mean(values, empty: float = float("nan")) -> float:
    """The arithmetic mean (sum over count, as every logged figure has been computed); `empty` when there are
    no values (nan: nothing was measured; the cost table's counts read 0)."""
    values = list(values)
    return sum(values) / len(values) if values else empty


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


def on_unit_scale(metric: str) -> bool:
    """Is `metric` scored between 0 and 1 per example (agreement with a teacher or expectations too)?"""
    return metric.removeprefix(AGREES_WITH_TEACHER).removeprefix(AGREES_WITH_EXPECTED) in UNIT_SCALE


def format_table(headers: list[str], rows: list[list]) -> str:
    """A plain-text table; floats get 4 decimals, None shows as '-'."""
    def cell(v):
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def comparison_table(metrics: dict[str, float]) -> str:
    """Metrics side by side per contender; `*` marks the best value of each quality row (none on a tie). The
    cost rows (COST_METRICS) follow under a blank line, unmarked: fewer tokens or parameters is not better by
    itself."""
    contenders = [c for c in CONTENDERS if any(k.startswith(f"eval/{c}/") for k in metrics)]
    names = list(dict.fromkeys(k.split("/", 2)[2] for k in metrics if k.count("/") == 2))
    rows = []
    for m in [m for m in names if m not in COST_METRICS]:
        values = [metrics.get(f"eval/{c}/{m}") for c in contenders]
        known = [v for v in values if v is not None]
        best = (min if lower_is_better(m) else max)(known) if len(set(known)) > 1 else None
        rows.append([m, *(None if v is None else f"{v:.4f}{' *' if v == best else ''}" for v in values)])
    costs = [m for m in COST_METRICS if m in names]
    if costs:
        rows.append([""] * (len(contenders) + 1))
        rows += [[m, *(cost_cell(m, metrics.get(f"eval/{c}/{m}")) for c in contenders)] for m in costs]
    return format_table(["metric", *contenders], rows)


def cost_cell(metric: str, value: float | None) -> str | None:
    """A cost figure as the table shows it: parameters in millions or billions, seconds to 3 decimals."""
    if value is None:
        return None
    if metric == "params":
        return f"{value / 1e9:.2f}B" if value >= 1e9 else f"{value / 1e6:.2f}M"
    return f"{value:.3f}" if metric == "latency_s" else f"{value:.1f}"
