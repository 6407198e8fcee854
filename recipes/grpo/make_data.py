"""Write the GRPO data: two-digit additions whose answer a reward function can check (`answer` column).

Prompt-only rows (`prompt_only`): the question and its answer, no completion to imitate; GRPO samples answers and
the `exact_answer` reward compares each with `answer`. The phrasing varies; the system prompt (finetune.yaml) asks
for the number only. Train and eval share no pair of numbers.
Deterministic (seeded); run by hand from anywhere:  python recipes/grpo/make_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_TRAIN, N_EVAL = 320, 40
PHRASINGS = ["What is {a} + {b}?", "{a} + {b} = ?", "Add {a} and {b}.", "What do you get when you add {a} to {b}?",
             "Compute {a} plus {b}.", "How much is {a} + {b}?"]


def make_rows(rng: random.Random) -> tuple[list[dict], list[dict]]:
    pairs = set()
    while len(pairs) < N_TRAIN + N_EVAL:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if (b, a) not in pairs:  # 23 + 45 and 45 + 23 are the same question: never one in train, one in eval
            pairs.add((a, b))
    pairs = sorted(pairs)
    rng.shuffle(pairs)
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
