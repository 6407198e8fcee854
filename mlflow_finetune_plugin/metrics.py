"""Answer-quality metrics through the `evaluate` API, from modules shipped in `assets/metrics/` (loaded by path).

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
# Where lower is better; every other metric is better higher. `misrouted` (evaluate/scoring.py): the share of answers
# that are, word for word, the training answer of other questions.
LOWER_IS_BETTER = ("loss", "perplexity", "misrouted")

# Who answers the held-out prompts: metrics are logged as eval/<contender>/<metric>. base: the base model zero-shot;
# fewshot: with k random train conversations as shots; retrieval: with the k train conversations most similar to the
# question (BM25); tuned: the fine-tuned model; length: a reward model's rule-of-thumb rival, "the longer answer wins".
CONTENDERS = ("base", "fewshot", "retrieval", "length", "tuned")
# The prompt-only alternatives to fine-tuning, cheapest first: what the verdict and the default gates weigh it against.
ALTERNATIVES = ("base", "fewshot", "retrieval", "length")
# Forgetting figures (general-text loss and perplexity, base and tuned) are logged under this prefix.
FORGETTING_PREFIX = "eval/forgetting/"
# The verdict (evaluate/verdict.py): the tuned model's margin over the best alternative and its 95% interval, under
# this prefix (margin, margin_low, margin_high); the interval is a paired bootstrap of this many resamples, and no
# run evaluated on fewer than VERDICT_MIN_EXAMPLES held-out examples is called a pay-off.
VERDICT_PREFIX = "eval/verdict/"
VERDICT_RESAMPLES = 1000
VERDICT_MIN_EXAMPLES = 10


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
    """Aggregate scores and per-example scores of `predictions` against `references`, every value in [0, 1]."""
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


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


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
    """Metrics side by side per contender; `*` marks the best value of each row (none on a tie)."""
    contenders = [c for c in CONTENDERS if any(k.startswith(f"eval/{c}/") for k in metrics)]
    names = list(dict.fromkeys(k.split("/", 2)[2] for k in metrics if k.count("/") == 2))
    rows = []
    for m in names:
        values = [metrics.get(f"eval/{c}/{m}") for c in contenders]
        known = [v for v in values if v is not None]
        best = (min if lower_is_better(m) else max)(known) if len(set(known)) > 1 else None
        rows.append([m, *(None if v is None else f"{v:.4f}{' *' if v == best else ''}" for v in values)])
    return format_table(["metric", *contenders], rows)
