"""The verdict of a run: did fine-tuning pay off against the best thing a user could have done without it?

The alternatives are the prompt-only contenders (`metrics.ALTERNATIVES`: the base model zero-shot, with random
shots, with retrieved shots, with the optimized prompt a search on the train rows found: `prompt_search.py`).
The best of them on the primary metric is weighed against the tuned model on the same held-out examples, pair
by pair. Fine-tuning *paid off* only when the tuned model beats it beyond the evaluation's own noise *and* by
a gain that matters. The noise: a paired bootstrap (the held-out examples resampled with replacement,
`RESAMPLES` times, seeded) gives a 95% interval of the mean per-example difference (tuned - alternative), and
its lower bound must be above 0, on at least `MIN_EXAMPLES` examples. The gain: the mean difference must be at
least `eval.min_gain` (`min_gain_for`: 0.05 on a 0-1 metric by default). A run that barely trained answers
much as its base does: the differences centre on 0, or on a little above it, and it is not called a pay-off.

When the comparison is decided (enough examples) and fine-tuning did not pay off, the verdict recommends the
cheaper way: keep prompting, with what an answer costs each. The optimized prompt, when it was scored and the
tuned model does not beat it by the gain beyond the noise (`keep_prompt`: it is registered as
`<registry.name>-prompt`); else the best prompt-only contender.

The verdict is four run tags (five with the optimized prompt) (`tags.VERDICT*`), four metrics
(`eval/verdict/margin`, `margin_low`, `margin_high`, `min_gain`), a section of the model card, and the last
thing a run prints.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.metrics import (
    ALTERNATIVE_LABELS,
    ALTERNATIVES,
    CONTENDERS,
    DEFAULT_MIN_GAIN,
    FORGETTING_PREFIX,
    OPTIMIZED,
    VERDICT_MIN_EXAMPLES,
    VERDICT_PREFIX,
    VERDICT_RESAMPLES,
    lower_is_better,
    mean,
    on_unit_scale,
)

RESAMPLES = VERDICT_RESAMPLES
SEED = 0
CONFIDENCE = 0.95
# Below this many held-out examples a bootstrap interval is too optimistic to call anything a pay-off.
MIN_EXAMPLES = VERDICT_MIN_EXAMPLES
# Per-example scores (the file `report.log_evaluation` writes): contender -> metric -> one value per example.
SCORES_FILE = "eval/per_example_scores.json"
# The primary metric when no promotion gate names one with per-example scores: the first of these that was
# scored.
PREFERRED = ("rougeL", "reward", "pair_accuracy", "token_f1", "chrf", "exact_match", "json_valid")
LABELS = ALTERNATIVE_LABELS
NONE = "none"  # best_alternative when no prompt-only contender was scored


@dataclass
class Verdict:
    paid_off: bool
    best_alternative: str = NONE           # base | fewshot | retrieval | none
    metric: str = ""
    tuned: float | None = None             # mean over the paired examples
    alternative: float | None = None
    low: float | None = None               # 95% bootstrap interval of the mean (tuned - alternative), in the
    high: float | None = None              # metric's better direction (positive: the tuned model is better)
    n: int = 0
    ppl_ratio: float | None = None         # eval/forgetting/ppl_ratio, when measured
    reason: str = ""                       # why there is no comparison at all
    teacher: str = ""                      # with a teacher contender: can the student stand in (teacher.py)?
    cost: str = ""                         # what an answer costs each contender (cost.cost_line)
    prompt: float | None = None            # the optimized prompt's mean, when it was scored
    prompt_low: float | None = None        # 95% interval of the mean (tuned - optimized), better direction
    prompt_high: float | None = None
    prompt_cost: str = ""                  # its prompt tokens and latency against the tuned model's
    # the least margin that counts (eval.min_gain, in the metric's units)
    min_gain: float = 0.0
    prompt_gain: float | None = None       # mean (tuned - optimized), better direction
    # the best alternative's prompt tokens and latency against the tuned's
    alternative_cost: str = ""
    # where the run registers the optimized prompt (prompts:/NAME@candidate)
    registered_prompt: str = ""

    @property
    def decided(self) -> bool:
        """Enough paired examples to weigh the tuned model against the best alternative."""
        return self.margin is not None and self.low is not None and self.n >= MIN_EXAMPLES

    @property
    def keep_prompt(self) -> bool:
        """The optimized prompt ties or beats the tuned model: the tuned model is not better by `min_gain`
        beyond the noise."""
        return (not self.paid_off and self.prompt_low is not None and self.n >= MIN_EXAMPLES
                and not _beats(self.prompt_low, self.prompt_gain, self.min_gain))

    @property
    def deploy(self) -> str:
        """What to deploy: tuned when it paid off, else the prompt the verdict recommends; none when
        undecided."""
        if self.paid_off:
            return "tuned"
        if self.keep_prompt:
            return OPTIMIZED
        return self.best_alternative if self.decided else NONE

    @property
    def margin(self) -> float | None:
        """How much better the tuned model is than the alternative (positive: better, whichever way is
        better)."""
        if self.tuned is None or self.alternative is None:
            return None
        return (
            self.alternative - self.tuned if lower_is_better(self.metric) else self.tuned - self.alternative
        )

    def sentence(self) -> str:
        """The verdict in one sentence, with the margin and, when measured, the forgetting ratio; then what to
        keep instead when it did not pay off; with a teacher, a second sentence on whether the student can
        stand in."""
        first = self._against_alternatives()
        if self.keep_prompt:
            first += f"; {self.prompt_sentence()}"
        elif self.decided and not self.paid_off:
            first += f"; {self._keep_alternative()}"
        return f"{first}. {self.teacher}" if self.teacher else first

    def prompt_sentence(self) -> str:
        """`keep the prompt: ...`: the optimized prompt against the tuned model, and what an answer costs
        each."""
        wins = self.prompt_high is not None and _beats(-self.prompt_high, -(self.prompt_gain or 0.0),
                                                       self.min_gain)
        how = "beats" if wins else "ties" if self.prompt_low <= 0 else "is within eval.min_gain of"
        where = f"; it is registered as {self.registered_prompt}" if self.registered_prompt else ""
        return (
            f"keep the prompt: the optimized prompt {how} the tuned model ({self.metric} {self.prompt:.2f} "
            f"vs {self.tuned:.2f}; 95% interval of tuned - prompt {self.prompt_low:+.2f} to "
            f"{self.prompt_high:+.2f}){', ' + self.prompt_cost if self.prompt_cost else ''}{where}")

    def _keep_alternative(self) -> str:
        """Not paid off, and no optimized prompt to keep: the best alternative, as good or better, and cheaper
        to keep (no fine-tuned model to train, register and serve), with what an answer costs each."""
        wins = "beats the tuned model and " if _beats(-self.high, -self.margin, self.min_gain) else ""
        cost = f": {self.alternative_cost}" if self.alternative_cost else ""
        return f"keep {LABELS[self.best_alternative]}, which {wins}needs no fine-tuned model to keep{cost}"

    def _against_alternatives(self) -> str:
        forgetting = "" if self.ppl_ratio is None else f"; general-text perplexity x{self.ppl_ratio:.2f}"
        if self.margin is None:
            return f"no verdict: {self.reason}{forgetting}"
        versus = (f"{self.metric} {self.margin:+.2f} over {LABELS[self.best_alternative]} "
                  f"({self.alternative:.2f})")
        if self.paid_off:
            return f"fine-tuning paid off: {versus}{forgetting}"
        interval = f"95% interval {self.low:+.2f} to {self.high:+.2f} over {self.n} examples"
        if self.n < MIN_EXAMPLES:
            why = f"only {self.n} held-out examples, too few to tell (at least {MIN_EXAMPLES})"
        elif self.low > 0:
            why = (f"above the evaluation's noise but under the least gain that matters (eval.min_gain "
                   f"{self.min_gain:.2f}; {interval}): the two are equivalent")
        else:
            why = f"not above the evaluation's noise ({interval})"
        return f"fine-tuning did not pay off: {versus}, {why}{forgetting}"

    def as_tags(self) -> dict[str, str]:
        out = {tags.VERDICT: self.sentence(), tags.VERDICT_BEST_ALTERNATIVE: self.best_alternative,
               tags.VERDICT_PAID_OFF: str(self.paid_off).lower(), tags.VERDICT_DEPLOY: self.deploy}
        if self.prompt_low is not None:
            out[tags.VERDICT_KEEP_PROMPT] = str(self.keep_prompt).lower()
        return out

    def as_metrics(self) -> dict[str, float]:
        values = {"margin": self.margin, "margin_low": self.low, "margin_high": self.high,
                  "min_gain": self.min_gain if self.margin is not None else None}
        return {f"{VERDICT_PREFIX}{k}": float(v) for k, v in values.items() if v is not None}


def _beats(low: float | None, gain: float | None, min_gain: float) -> bool:
    """One contender beats another: the 95% interval of (one - other) is above 0 and the mean gain is at least
    `min_gain` (a rounding error's worth of slack)."""
    return low is not None and gain is not None and low > 0 and gain >= min_gain - 1e-12


def min_gain_for(metric: str, setting: float | dict | None, scores: dict[str, list[float | None]]) -> float:
    """The least gain that counts on `metric`, in its units. `setting` is `eval.min_gain`: a number is a share
    of the metric's scale (a metric scored 0-1: its own units; any other, e.g. reward: the range its
    per-example `scores` span across the contenders); a mapping gives named metrics their gain in their own
    units, and the others DEFAULT_MIN_GAIN as a share."""
    if isinstance(setting, dict) and metric in setting:
        return float(setting[metric])
    share = float(setting) if isinstance(setting, (int, float)) else DEFAULT_MIN_GAIN
    if on_unit_scale(metric):
        return share
    values = [v for column in scores.values() for v in column or [] if v is not None]
    return share * (max(values) - min(values)) if values else 0.0


def paired_bootstrap(tuned: list[float], other: list[float], resamples: int = RESAMPLES,
                     seed: int = SEED) -> tuple[float, float]:
    """The 95% percentile interval of the mean of (tuned - other) over examples resampled with replacement."""
    import numpy as np

    diffs = np.asarray(tuned, dtype=float) - np.asarray(other, dtype=float)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def decide(scores: dict[str, list[float | None]], metric: str, ppl_ratio: float | None = None,
           min_gain: float | dict | None = None) -> Verdict:
    """The verdict from per-example `scores` (contender -> one value of `metric` per example, None where
    missing); `min_gain`: `eval.min_gain` (None: its default; `min_gain_for`)."""
    tuned = scores.get("tuned")
    if not tuned:
        return Verdict(False, metric=metric, ppl_ratio=ppl_ratio,
                       reason=f"the tuned model has no {metric} scores")
    sign = -1.0 if lower_is_better(metric) else 1.0
    paired = {}
    for name in ALTERNATIVES:
        pairs = [(t, o) for t, o in zip(tuned, scores.get(name) or []) if t is not None and o is not None]
        if pairs:
            paired[name] = pairs
    if not paired:
        return Verdict(False, metric=metric, ppl_ratio=ppl_ratio,
                       reason="no prompt-only alternative was scored (a full fine-tune evaluated without its "
                              "base model, or no base to compare)")
    gain = min_gain_for(metric, min_gain, scores)
    # Cheapest first in ALTERNATIVES, so on a tie the cheaper alternative is the one named.
    best = max(paired, key=lambda name: sign * mean([o for _, o in paired[name]]))
    pairs = paired[best]
    low, high = paired_bootstrap([sign * t for t, _ in pairs], [sign * o for _, o in pairs])
    verdict = Verdict(False, best, metric, mean([t for t, _ in pairs]), mean([o for _, o in pairs]), low,
                      high, len(pairs), ppl_ratio, min_gain=gain)
    verdict.paid_off = verdict.n >= MIN_EXAMPLES and _beats(low, verdict.margin, gain)
    if OPTIMIZED in paired:  # keep the prompt? (Verdict.keep_prompt)
        prompt_pairs = paired[OPTIMIZED]
        verdict.prompt = mean([o for _, o in prompt_pairs])
        verdict.prompt_gain = sign * (mean([t for t, _ in prompt_pairs]) - verdict.prompt)
        verdict.prompt_low, verdict.prompt_high = paired_bootstrap([sign * t for t, _ in prompt_pairs],
                                                                   [sign * o for _, o in prompt_pairs])
    return verdict


def primary_metric(gates, scores: dict[str, dict[str, list]]) -> str | None:
    """The metric the verdict weighs: the first promotion gate's metric (a comparison, not a limit) that has
    per-example scores of the tuned model, else the first of PREFERRED that has; None when nothing has."""
    scored = set(scores.get("tuned") or {})
    for gate in gates or []:
        if gate.beats and gate.metric in scored:
            return gate.metric
    return next((m for m in PREFERRED if m in scored), next(iter(sorted(scored)), None))


def per_example_scores(rows: list[dict]) -> dict[str, dict[str, list[float | None]]]:
    """contender -> metric -> per-example values, from the examples table's `<contender>_<metric>` number
    columns."""
    out: dict[str, dict[str, list[float | None]]] = {}
    for i, row in enumerate(rows):
        for key, value in row.items():
            name, _, metric = key.partition("_")
            if name in CONTENDERS and metric and isinstance(value, (int, float)) and not isinstance(value,
                                                                                                    bool):
                out.setdefault(name, {}).setdefault(metric, [None] * len(rows))[i] = float(value)
    return out


def conclude(run_id: str, gates=None, scores: dict | None = None, min_gain: float | dict | None = None,
             registered: str | None = None) -> Verdict:
    """The verdict of run `run_id` from its per-example scores (`scores`, or the SCORES_FILE it logged) and
    its forgetting ratio; set as its tags and metrics, and returned. With nothing evaluated: "no verdict", not
    paid off. `min_gain`: `eval.min_gain`; `registered`: the registered model's name, under which the run
    registers its optimized prompt (`registry/prompts.py`), for the verdict to name it."""
    from mlflow import MlflowClient

    from mlflow_finetune_plugin.evaluate.cost import cost_line
    from mlflow_finetune_plugin.evaluate.teacher import teacher_sentence
    from mlflow_finetune_plugin.registry.prompts import CANDIDATE, PREFIX, prompt_name

    client = MlflowClient()
    metrics = client.get_run(run_id).data.metrics
    ratio = metrics.get(f"{FORGETTING_PREFIX}ppl_ratio")
    scores = scores if scores is not None else _logged_scores(client, run_id)
    metric = primary_metric(gates, scores) if scores else None
    if metric is None:
        verdict = Verdict(False, ppl_ratio=ratio, reason="nothing was evaluated (no held-out rows, or "
                                                         "eval.enabled: false)")
    else:
        verdict = decide({name: values.get(metric) for name, values in scores.items()}, metric, ratio,
                         min_gain)
        verdict.teacher = teacher_sentence(metrics, scores, metric, paired_bootstrap) or ""
    verdict.cost = cost_line(metrics) or ""
    verdict.prompt_cost = answer_cost(metrics, OPTIMIZED)
    verdict.alternative_cost = answer_cost(metrics, verdict.best_alternative)
    if registered:
        verdict.registered_prompt = f"{PREFIX}{prompt_name(registered)}@{CANDIDATE}"
    for key, value in verdict.as_tags().items():
        client.set_tag(run_id, key, value)
    for key, value in verdict.as_metrics().items():
        client.log_metric(run_id, key, value)
    return verdict


def answer_cost(metrics: dict[str, float], contender: str) -> str:
    """`contender`'s prompt tokens and seconds per answer against the tuned model's ('' when not timed)."""
    def get(name, metric):
        return metrics.get(f"eval/{name}/{metric}")

    if get(contender, "prompt_tokens") is None or get("tuned", "prompt_tokens") is None:
        return ""
    said = (f"at {get(contender, 'prompt_tokens'):.0f} prompt tokens an answer against the tuned model's "
            f"{get('tuned', 'prompt_tokens'):.0f}")
    if get(contender, "latency_s") is not None and get("tuned", "latency_s") is not None:
        said += f", {get(contender, 'latency_s'):.3f} s against {get('tuned', 'latency_s'):.3f} s"
    return said


def _logged_scores(client, run_id: str) -> dict:
    import json
    import tempfile

    folder = SCORES_FILE.rpartition("/")[0]
    if SCORES_FILE not in {a.path for a in client.list_artifacts(run_id, folder)}:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        with open(client.download_artifacts(run_id, SCORES_FILE, tmp), encoding="utf-8") as f:
            return json.load(f)
