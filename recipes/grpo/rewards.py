"""The project's own reward functions for GRPO, named in finetune.yaml (`grpo.rewards`).

A reward function takes TRL's arguments by name: `prompts` and `completions` (one entry per sampled
completion; with chat prompts a completion is `[{"role": "assistant", "content": ...}]`), plus any column of
the data it declares (`answer`) or `**kwargs`. It returns one float per completion (None: cannot score this
one).
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"[-+]?\d+")


def brevity(prompts, completions, **kwargs) -> list[float]:
    """1.0 for a reply that is a bare number, less the more text surrounds it (0 at 40 characters or more), 0
    for a reply without a number.

    Says nothing about whether the number is right (exact_answer does): it rewards the format the system
    prompt asks for, so a correct answer buried in a sentence scores less than the same answer alone.
    """
    scores = []
    for completion in completions:
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        if not _NUMBER.search(text):
            scores.append(0.0)
            continue
        rest = _NUMBER.sub("", text.strip(), count=1).strip(" .\n")
        scores.append(max(0.0, 1.0 - len(rest) / 40))
    return scores
