"""User-facing errors: each says what was wrong, where, and what to do."""

from __future__ import annotations


class FinetuneError(Exception):
    """An error caused by the user's input or environment, shown without a traceback."""


class RecipeError(FinetuneError):
    """One or more problems in a recipe; all of them are reported together."""

    def __init__(self, problems: list[str], source: str = "finetune.yaml"):
        self.problems = list(problems)
        self.source = source
        n = len(self.problems)
        head = f"{source}: {n} problem{'s' if n != 1 else ''} in the recipe:"
        super().__init__("\n".join([head, *("  - " + p for p in self.problems)]))
