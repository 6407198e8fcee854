"""A gate: a comparison a version must win (promotion, `registry.promote_if`) or a limit a metric must keep
(promotion's limits, and `monitor.gates` on served traffic)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mlflow_finetune_plugin.config.section import Section


class Gate(Section):
    """One promotion gate: the tuned model must beat every contender in `beats` on `metric` by `margin`."""

    metric: str = Field(
        description="metric name without prefix (`rougeL`, `token_f1`, `loss`, ...); one with a `/` is "
                    "`eval/<metric>` (`forgetting/ppl_ratio`), `arena_above` compares playground ratings")
    beats: list[str] = Field(
        ["base", "fewshot", "retrieval", "rag", "optimized", "champion"],
        description="`base`, `fewshot`, `retrieval`, `rag`, `optimized` (same run; named here, a contender "
                    "the run did not score fails the gate; left at the default, it is passed over with the "
                    "run's reason), `champion` (holder of the alias being moved), `@alias`, or a version")
    margin: float = Field(0.0, ge=0, description="absolute improvement required (0: not worse)")
    mode: Literal["max", "min"] | None = Field(
        None, json_schema_extra={"default_text": "empty (min for loss/perplexity, else max)"},
        description="which direction is better")
    at_most: float | None = Field(
        None, description="a limit instead of a comparison: the version's own metric must be <= this (then "
                          "`beats` is empty)")
    at_least: float | None = Field(None, description="a limit: the version's own metric must be >= this")

    @property
    def limits(self) -> list[tuple[str, float]]:
        """The limits of a limit gate, as (`<=` | `>=`, bound); empty for a comparison."""
        return [(op, b) for op, b in (("<=", self.at_most), (">=", self.at_least)) if b is not None]

    def broken_limits(self, value: float) -> list[tuple[str, float]]:
        """The limits `value` breaks (a rounding error's worth of slack)."""
        return [(op, b) for op, b in self.limits if (value > b + 1e-12 if op == "<=" else value < b - 1e-12)]

    @model_validator(mode="before")
    @classmethod
    def _limit_compares_with_nothing(cls, data):
        if isinstance(data, dict) and (data.get("at_most") is not None or data.get("at_least") is not None):
            if data.get("beats"):
                raise ValueError(
                    "a gate with at_most/at_least checks a limit and beats nothing; drop `beats` "
                    "(or write the comparison as a gate of its own)")
            data = {**data, "beats": []}
        return data
