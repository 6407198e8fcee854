"""The verdict of a documents recipe: prompting, RAG, fine-tuning, or both? (`documents.py` scores them.)

On each held-out set (questions on known documents, on unseen documents), the best contender on the primary
metric is weighed against each other one pair by pair, with the paired bootstrap of `verdict.py`: it *beats*
another when the 95% interval of the difference lies above 0 and the mean difference is at least
`eval.min_gain` (the verdict's rule, `verdict.min_gain_for`), and *ties* it otherwise. What to deploy is the
cheapest contender per answer that no other beats on any scored set, in this order: zero-shot (no training, no
context), the tuned model alone (no context), RAG (the chunks in every prompt), the tuned model with RAG. When
every contender is beaten somewhere, the best on known documents is named. The verdict says why, with what an
answer costs (prompt tokens with the retrieved chunks against none, latency) and how often retrieval found the
chunk holding the answer (recall@k).

It is set as the run's verdict tags (`finetune.verdict`, `.paid_off`: fine-tuning is part of what to deploy,
`.best_alternative`: the better of zero-shot and RAG, `.deploy`) and metrics (`eval/verdict/margin*`: what to
deploy over the best prompt-only contender on known documents; `eval/verdict/min_gain`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.data.document_rows import KNOWN, UNSEEN
from mlflow_finetune_plugin.evaluate.verdict import (
    MIN_EXAMPLES,
    min_gain_for,
    paired_bootstrap,
    primary_metric,
)
from mlflow_finetune_plugin.metrics import (
    RAG,
    RECALL,
    TUNED_RAG,
    UNSEEN_PREFIX,
    VERDICT_PREFIX,
    lower_is_better,
    mean,
)

# Cheapest per answer first.
ORDER = ("base", "tuned", RAG, TUNED_RAG)
LABELS = {"base": "zero-shot", "tuned": "the tuned model alone", RAG: "RAG on the base model",
          TUNED_RAG: "the tuned model with RAG"}


@dataclass
class Comparison:
    other: str
    mean: float
    low: float        # 95% interval of (best - other), in the metric's better direction
    high: float
    gain: float = 0.0      # the mean of (best - other), better direction
    min_gain: float = 0.0  # the least gain that counts (eval.min_gain, in the metric's units)

    @property
    def beaten(self) -> bool:
        return self.low > 0 and self.gain >= self.min_gain - 1e-12


@dataclass
class SetVerdict:
    name: str
    n: int
    best: str
    means: dict[str, float]
    comparisons: list[Comparison]
    # each retrieving contender against the tuned model alone (retrieving - tuned): does retrieval answer what
    # the weights do not know? Said for the unseen documents, where only retrieval can.
    retrieval: list[Comparison] = field(default_factory=list)

    def sentence(self, metric: str) -> str:
        parts = []
        for c in self.comparisons:
            how = "beats" if c.beaten else "ties"
            parts.append(f"{how} {LABELS[c.other]} ({c.mean:.2f}; {c.low:+.2f} to {c.high:+.2f})")
        said = (f"on {self.name} documents ({self.n} questions), {LABELS[self.best]} scores {metric} "
                f"{self.means[self.best]:.2f} and " + ", ".join(parts))
        if self.name == UNSEEN and self.retrieval:
            said += "; with retrieval, " + ", ".join(
                f"{LABELS[c.other]} {'beats' if c.beaten else 'ties'} the tuned model alone ({c.mean:.2f} "
                f"against {self.means['tuned']:.2f}; {c.low:+.2f} to {c.high:+.2f})" for c in self.retrieval)
        return said

    def beaten(self, contender: str) -> bool:
        return any(c.other == contender and c.beaten for c in self.comparisons)


@dataclass
class DocumentsVerdict:
    deploy: str | None
    metric: str = ""
    sets: list[SetVerdict] = field(default_factory=list)
    why: str = ""
    cost: str = ""
    reason: str = ""              # why there is no verdict
    margin: tuple[float, float, float] | None = None  # deploy - best prompt-only on known: mean, low, high
    min_gain: float = 0.0         # the least gain that counts on known documents (eval.min_gain)

    @property
    def paid_off(self) -> bool:
        return self.deploy in ("tuned", TUNED_RAG)

    def sentence(self) -> str:
        if self.deploy is None:
            return f"no verdict: {self.reason}"
        said = "; ".join(s.sentence(self.metric) for s in self.sets)
        against = ", and of each retrieving contender minus the tuned model alone" if any(
            s.retrieval and s.name == UNSEEN for s in self.sets) else ""
        return (
            f"deploy {LABELS[self.deploy]} ({self.deploy}): {self.why}. {said[0].upper()}{said[1:]}"
            f" (95% intervals of the best minus each{against}; one beats another when the interval is above "
            f"0 and the gain at least {self.min_gain:.2f}, eval.min_gain)"
        )

    def as_tags(self) -> dict[str, str]:
        known = next((s for s in self.sets if s.name == KNOWN), None)
        alternative = max(("base", RAG), key=lambda c: known.means.get(c, float("-inf"))) if known else "none"
        return {tags.VERDICT: self.sentence(), tags.VERDICT_PAID_OFF: str(self.paid_off).lower(),
                tags.VERDICT_BEST_ALTERNATIVE: alternative, tags.VERDICT_DEPLOY: self.deploy or "none"}

    def as_metrics(self) -> dict[str, float]:
        if self.margin is None:
            return {}
        return {**dict(zip((f"{VERDICT_PREFIX}margin", f"{VERDICT_PREFIX}margin_low",
                            f"{VERDICT_PREFIX}margin_high"), self.margin)),
                f"{VERDICT_PREFIX}min_gain": self.min_gain}


def weigh_set(name: str, scores: dict[str, list[float | None]], metric: str,
              min_gain: float | dict | None = None) -> SetVerdict | None:
    """The best contender of one set and how it compares with each other (None when fewer than two were
    scored); `min_gain`: `eval.min_gain`."""
    sign = -1.0 if lower_is_better(metric) else 1.0
    scored = {c: v for c in ORDER if (v := scores.get(c))}
    if len(scored) < 2:
        return None
    gain = min_gain_for(metric, min_gain, scored)
    means = {c: mean([x for x in v if x is not None]) for c, v in scored.items()}
    # ties on the mean go to the cheaper contender (ORDER)
    best = max(scored, key=lambda c: (sign * means[c], -ORDER.index(c)))
    comparisons = []
    for other in [c for c in scored if c != best]:  # too few pairs to tell: never called beaten
        found = _compared(scored[best], scored[other], sign, other, means[other], gain)
        comparisons.append(found)
    against_tuned = [_compared(scored[c], scored["tuned"], sign, c, means[c], gain) for c in (RAG, TUNED_RAG)
                     if c in scored and "tuned" in scored]
    return SetVerdict(name, len(next(iter(scored.values()))), best, means, comparisons, against_tuned)


def _compared(these: list, those: list, sign: float, name: str, its_mean: float,
              min_gain: float) -> Comparison:
    """`name` (scores `these`) against `those`: the 95% interval of these - those and its mean, better
    direction."""
    pairs = [(a, b) for a, b in zip(these, those) if a is not None and b is not None]
    low, high = paired_bootstrap([sign * a for a, _ in pairs], [sign * b for _, b in pairs])
    gain = sign * mean([a - b for a, b in pairs])
    low = min(low, 0.0) if len(pairs) < MIN_EXAMPLES else low
    return Comparison(name, its_mean, low, high, gain, min_gain)


def decide(per_set: dict[str, dict[str, dict[str, list]]], gates=None,
           min_gain: float | dict | None = None) -> DocumentsVerdict:
    """The verdict from per-example scores: set name -> contender -> metric -> values; `min_gain`:
    eval.min_gain."""
    known = per_set.get(KNOWN) or next(iter(per_set.values()), {})
    metric = primary_metric(gates, known) if known else None
    if metric is None:
        return DocumentsVerdict(None, reason="no held-out question was scored")
    sets = [v for name in (KNOWN, UNSEEN) if name in per_set
            and (v := weigh_set(name, {c: m.get(metric) for c, m in per_set[name].items()}, metric,
                                min_gain))]
    if not sets:
        return DocumentsVerdict(None, metric, reason="fewer than two contenders were scored")
    standing = [c for c in ORDER if all(c in s.means and not s.beaten(c) for s in sets)]
    if standing:
        deploy = standing[0]
        cheaper = [c for c in ORDER[: ORDER.index(deploy)] if any(c in s.means for s in sets)]
        why = ("no other contender beats it beyond the noise by eval.min_gain on "
               + ("either set" if len(sets) > 1 else "the set"))
        if cheaper:
            losing = [f"{LABELS[c]} on {' and '.join(s.name for s in sets if s.beaten(c))} documents"
                      for c in cheaper]
            why += f", and each cheaper one is beaten: {'; '.join(losing)}"
    else:
        deploy = sets[0].best
        why = f"it is the best on {sets[0].name} documents, and every contender is beaten on some set"
    gain = next((c.min_gain for s in sets for c in s.comparisons), 0.0)  # the first set's: known documents
    return DocumentsVerdict(deploy, metric, sets, why, margin=_margin(deploy, per_set.get(KNOWN), metric),
                            min_gain=gain)


def _margin(deploy: str, scores: dict | None, metric: str) -> tuple[float, float, float] | None:
    """`deploy` minus the better prompt-only contender (zero-shot or RAG) on known documents, better
    direction."""
    if not scores or deploy in ("base", RAG):
        return None
    sign = -1.0 if lower_is_better(metric) else 1.0
    prompt_only = [c for c in ("base", RAG) if (scores.get(c) or {}).get(metric)]
    if not prompt_only or not (scores.get(deploy) or {}).get(metric):
        return None
    best = max(prompt_only, key=lambda c: sign * mean([x for x in scores[c][metric] if x is not None]))
    pairs = [(d, o) for d, o in zip(scores[deploy][metric],
                                    scores[best][metric]) if d is not None and o is not None]
    low, high = paired_bootstrap([sign * d for d, _ in pairs], [sign * o for _, o in pairs])
    return sign * (mean([d for d, _ in pairs]) - mean([o for _, o in pairs])), low, high


def cost_sentence(metrics: dict[str, float], k: int) -> str:
    """What an answer costs with retrieval against without, and how often retrieval found the answer's
    chunk."""
    def get(name, contender, prefix="eval/"):
        return metrics.get(f"{prefix}{contender}/{name}")

    parts = []
    if get("prompt_tokens", TUNED_RAG) is not None and get("prompt_tokens", "tuned") is not None:
        parts.append(
            f"with retrieval an answer reads {get('prompt_tokens', TUNED_RAG):.0f} prompt tokens against "
            f"{get('prompt_tokens', 'tuned'):.0f} without")
    if get("latency_s", TUNED_RAG) is not None and get("latency_s", "tuned") is not None:
        parts.append(
            f"median latency {get('latency_s', TUNED_RAG):.3f} s against {get('latency_s', 'tuned'):.3f} s "
            "on this machine")
    recalls = [(where, value) for where, prefix in ((KNOWN, "eval/"), (UNSEEN, UNSEEN_PREFIX))
               if (value := get(RECALL, RAG, prefix)) is not None]
    if recalls:
        parts.append(f"retrieval recall@{k} " + ", ".join(f"{v:.2f} on {w} documents" for w, v in recalls))
    return ("Cost per answer: " + "; ".join(parts) + ".") if parts else ""


def conclude_documents(run_id: str, per_set: dict, k: int, gates=None,
                       min_gain: float | dict | None = None) -> DocumentsVerdict:
    """Decide, set the run's verdict tags and metrics, and return the verdict; `min_gain`: eval.min_gain."""
    from mlflow import MlflowClient

    client = MlflowClient()
    verdict = decide(per_set, gates, min_gain)
    verdict.cost = cost_sentence(client.get_run(run_id).data.metrics, k)
    for key, value in verdict.as_tags().items():
        client.set_tag(run_id, key, value[:5000])
    for key, value in verdict.as_metrics().items():
        client.log_metric(run_id, key, value)
    return verdict
