"""Serving parity, the outcome: whether the engine a version will be served on answers its held-out prompts as
its evaluation did, and where that is recorded.

Before the champion alias moves, `promotion.promote` has the version's held-out prompts answered by the
serving engine (`serving/parity.py`: the merged copy `serve --engine transformers` loads, or vLLM), and the
answers weighed against the tuned answers its evaluation recorded (`evaluate/parity.py`): the same score
within the bootstrap's noise, and the same endings row by row. This module holds that outcome (`Parity`), its
sentence and report, and records it on the version: `finetune.parity.*` tags and a section of the model card
(the version's description).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from mlflow_finetune_plugin import tags

PASSED, FAILED, NOT_CHECKED, SKIPPED = "passed", "failed", "not checked", "skipped"
ENGINES = ("transformers", "vllm")
OFF = "off"
HEADING = "## Serving parity"
SHOWN_ROWS = 10  # differing rows printed and written into the card; the tags count them all


@dataclass
class RowDiff:
    """A held-out row whose served answer ended otherwise than the evaluated one."""

    row: int                       # 1-based, in the evaluation's order (eval/examples.json)
    prompt: str                    # its last user message
    evaluated: str                 # the answer the evaluation recorded
    served: str                    # the answer the engine gave
    evaluated_ending: str | None   # stop | length (None: not recorded)
    served_ending: str             # stop | length | ran on
    why: str                       # the difference in words


@dataclass
class Parity:
    status: str                    # PASSED | FAILED | NOT_CHECKED | SKIPPED
    engine: str = ""
    metric: str = ""
    evaluated: float | None = None     # mean of `metric` over the rows, evaluated answers
    served: float | None = None        # the same, served answers
    low: float | None = None           # 95% paired-bootstrap interval of the mean (served - evaluated)
    high: float | None = None
    rows: int = 0                      # rows answered and compared
    same_text: int = 0                 # of them, served answer word for word the evaluated one
    differing: list[RowDiff] = field(default_factory=list)
    note: str = ""                     # why it was not checked or skipped; what could not be checked

    @property
    def passed(self) -> bool:
        """Only a check that found a difference fails; not checked and skipped pass over (and say why)."""
        return self.status != FAILED

    @property
    def score_within_noise(self) -> bool:
        return self.low is None or self.low <= 1e-12 and self.high >= -1e-12

    def sentence(self) -> str:
        """The outcome in one sentence (the `finetune.parity` tag, the report's first line)."""
        if self.status in (NOT_CHECKED, SKIPPED):
            return f"{self.status}: {self.note}"
        parts = []
        if self.rows:
            ended = (f"{len(self.differing)} of {self.rows} rows end otherwise (rows "
                     f"{', '.join(str(d.row) for d in self.differing)})" if self.differing
                     else f"the same endings on all {self.rows} rows")
            parts.append(ended)
        if self.served is not None:
            noise = "within" if self.score_within_noise else "OUTSIDE"
            parts.append(
                f"{self.metric} {self.served:.3f} served vs {self.evaluated:.3f} evaluated, {noise} the "
                f"noise (95% interval of served - evaluated {self.low:+.3f} to {self.high:+.3f})")
        if self.rows:
            parts.append(f"{self.same_text} of {self.rows} answers word for word the same")
        if self.note:
            parts.append(self.note)
        verb = "served as evaluated" if self.status == PASSED else "NOT served as evaluated"
        return f"{self.status}: {verb} by {self.engine}: " + "; ".join(parts)

    def report(self) -> str:
        """The lines `mlflow-finetune promote` prints: the sentence, and each differing row (the first
        SHOWN_ROWS)."""
        lines = [f"Serving parity: {self.sentence()}"]
        for d in self.differing[:SHOWN_ROWS]:
            lines += [f"  row {d.row} ({_short(d.prompt, 60)}): {d.why}",
                      f"    evaluated ({d.evaluated_ending or 'ending not recorded'}): {_short(d.evaluated)}",
                      f"    served ({d.served_ending}): {_short(d.served)}"]
        if len(self.differing) > SHOWN_ROWS:
            lines.append(f"  ... and {len(self.differing) - SHOWN_ROWS} more rows")
        return "\n".join(lines)

    def as_tags(self) -> dict[str, str]:
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        out = {tags.PARITY: self.sentence()[:5000], tags.PARITY_STATUS: self.status,
               tags.PARITY_CHECKED_AT: when}
        if self.engine:
            out[tags.PARITY_ENGINE] = self.engine
        if self.status in (PASSED, FAILED):
            out.update({tags.PARITY_ROWS: str(self.rows),
                        tags.PARITY_ROWS_DIFFERING: str(len(self.differing))})
        if self.served is not None:
            out.update({tags.PARITY_METRIC: self.metric, tags.PARITY_SCORE_SERVED: f"{self.served:.4f}",
                        tags.PARITY_SCORE_EVALUATED: f"{self.evaluated:.4f}"})
        return out

    def card_section(self) -> str:
        """The model card's section: the sentence, what was compared, and a table of the differing rows."""
        from mlflow_finetune_plugin.registry import model_card

        text = f"{HEADING}\n\n**{self.sentence()}.**"
        if self.status in (PASSED, FAILED):
            text += ("\n\nThe held-out prompts of the run's evaluation, answered by the serving engine as "
                     "`mlflow-finetune serve` runs it (its chat template and stop tokens, greedy, the "
                     "evaluation's max_new_tokens), scored with the evaluation's scorer; the means must "
                     "agree within a paired bootstrap's 95% interval and every answer must end as the "
                     "evaluated one did.")
        if self.differing:
            rows = [(d.row, _short(d.prompt, 40), d.evaluated_ending or "-", d.served_ending, d.why)
                    for d in self.differing[:SHOWN_ROWS]]
            text += "\n\n" + model_card.markdown_table(["row", "prompt", "evaluated", "served", "difference"],
                                                       rows)
        return text


def record(name: str, version: str, parity: Parity) -> None:
    """Set `parity`'s tags on the version, and its section in the version's model card (its description),
    where the version has one (versions registered by other tools have none)."""
    from mlflow import MlflowClient

    from mlflow_finetune_plugin.registry import model_card

    client = MlflowClient()
    for key, value in parity.as_tags().items():
        client.set_model_version_tag(name, version, key, value)
    card = client.get_model_version(name, version).description or ""
    if card.strip():
        client.update_model_version(name, version, description=model_card.description(
            model_card.with_section(card, HEADING, parity.card_section())))


def _short(text: str, limit: int = 100) -> str:
    one_line = " ".join((text or "").split())
    return repr(one_line if len(one_line) <= limit else one_line[: limit - 3] + "...")

