"""Write the DPO preference data: for each support-bot question, the right answer (chosen) against a wrong
one.

The rejected answer is a plausible reply that answers a different question (the canonical answer of another
intent), or a curt non-answer: the two mistakes a support bot should unlearn. Chat form (prompt and answers as
message lists), the format `mlflow-finetune votes export` writes too.
Deterministic (seeded); run by hand from anywhere:  python recipes/dpo/make_data.py
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("support_bot_data",
                                               HERE.parent / "support-bot" / "make_data.py")
support_bot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(support_bot)

NON_ANSWERS = ["I don't know.", "Please check the website.", "Contact support.",
               "That is not something I can help with."]


def preference_rows(chats: list[dict], rng: random.Random) -> list[dict]:
    answers = [a for _, a, _ in support_bot.INTENTS]
    rows = []
    for chat in chats:
        *prompt, chosen = chat["messages"]
        wrong = [a for a in answers if a != chosen["content"]]
        rejected = rng.choice(NON_ANSWERS) if rng.random() < 0.3 else rng.choice(wrong)
        rows.append({"prompt": prompt, "chosen": [chosen], "rejected": [{"role": "assistant",
                                                                         "content": rejected}]})
    return rows


def main() -> None:
    rng = random.Random(0)
    train_chats, eval_chats = support_bot.make_rows()
    out = HERE / "data"
    out.mkdir(exist_ok=True)
    for name, chats in {"train": train_chats, "eval": eval_chats}.items():
        rows = preference_rows(chats, rng)
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        print(f"{name}: {len(rows)} preference pairs -> {out / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
