"""`data.traces`: which traces a `traces:EXPERIMENT` source reads, and how their assessments count
(docs/traces.md); the reading itself is `data/traces.py`."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from pydantic import Field, field_validator

from mlflow_finetune_plugin.config.section import Section

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def moment_ms(value: str, now: datetime | None = None) -> int:
    """Milliseconds since the epoch of an ISO date/time (UTC unless it says) or of a duration ago (`7d`,
    `12h`)."""
    if m := _DURATION.match(value):
        ago = timedelta(seconds=float(m.group(1)) * _SECONDS[m.group(2)])
        return int(((now or datetime.now(timezone.utc)) - ago).timestamp() * 1000)
    moment = datetime.fromisoformat(value.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


class TracesConfig(Section):
    """Which traces `data.train: traces:EXPERIMENT` (and `data.eval`) read, and how their assessments count
    (docs/traces.md). The rows are made in the format the objective trains on: chat (sft), preference (dpo),
    unpaired_preference (kto), prompt_only (grpo)."""

    filter: str | None = Field(
        None, description="a `traces:` source: MLflow's trace filter string (`tags.app = 'support' AND "
                          "trace.status = 'OK'`)")
    since: str | None = Field(
        None, description="traces from this moment: ISO date/time (UTC unless it says) or a duration ago "
                          "(`7d`, `12h`, `30m`)")
    until: str | None = Field(None, description="traces before this moment (the same forms)")
    run_id: str | None = Field(None, description="only the traces logged under this run")
    model_id: str | None = Field(None, description="only the traces of this logged model (`m-...`)")
    feedback: list[str] = Field(
        ["user_feedback", "user_satisfaction", "thumbs_up", "thumbs", "helpful"],
        description="feedback names that count as a user's verdict (true/false, yes/no, thumbs up/down, "
                    "1/0); others, e.g. LLM judges', are ignored")
    expectations: list[str] = Field(
        ["expected_response", "expected_answer", "corrected_answer"],
        description="expectation names whose value (text or a message) is the answer to learn instead of "
                    "the logged one")
    unrated: bool = Field(
        True, description="sft: train on answers nobody rated too; `false`: only positive feedback or "
                          "expectations")

    @field_validator("since", "until")
    @classmethod
    def _moment(cls, value):
        if value is not None:
            try:
                moment_ms(value)
            except ValueError:
                raise ValueError("expected an ISO date or time (2026-11-01, 2026-11-01T08:00:00+01:00) or a "
                                 "duration ago (7d, 12h, 30m)") from None
        return value
