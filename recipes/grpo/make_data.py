"""Write the GRPO data: small additions (1-20 plus 1-9) whose answer a reward function can check (`answer`
column).

Prompt-only rows (`prompt_only`): the question and its answer, no completion to imitate; GRPO samples answers
and the `exact_answer` reward compares each with `answer`. The phrasing varies; the system prompt
(finetune.yaml) asks for the number only. Train and eval share no pair of numbers.
Deterministic (seeded); run by hand from anywhere:  python recipes/grpo/make_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_TRAIN, N_EVAL = 104, 40  # the 144 distinct pairs of 1-20 plus 1-9 (no pair in both)
PHRASINGS = ["What is {a} + {b}?", "{a} + {b} = ?", "Add {a} and {b}.",
             "What do you get when you add {a} to {b}?", "Compute {a} plus {b}.", "How much is {a} + {b}?"]


def make_rows(rng: random.Random) -> tuple[list[dict], list[dict]]:
    # SmolLM2-135M gets about a quarter of these right greedily (and as many of its samples at temperature
    # 0.7), so most groups of 4 samples hold a right and a wrong answer for GRPO to tell apart; on two-digit
    # sums it is right 3-12% of the time and a group rarely holds a right answer (measured 2026-11-22).
    pairs = sorted({(a, b) for a in range(1, 21) for b in range(1, 10)})
    pairs = [(a, b) for a, b in pairs if not (b < a <= 9)]  # 3 + 5 and 5 + 3 are the same question
    rng.shuffle(pairs)
    pairs = pairs[:N_TRAIN + N_EVAL]
    rows = [{"prompt": rng.choice(PHRASINGS).format(a=a, b=b), "answer": a + b} for a, b in pairs]
    return rows[:N_TRAIN], rows[N_TRAIN:]


def main() -> None:
    train, held_out = make_rows(random.Random(0))
    out = HERE / "data"
    out.mkdir(exist_ok=True)
    for name, rows in {"train": train, "eval": held_out}.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        print(f"{name}: {len(rows)} prompts -> {out / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
