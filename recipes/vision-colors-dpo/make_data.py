"""Write the vision-colors-dpo preference data from the vision-colors rows: data/train.jsonl and
data/eval.jsonl.

Each row is a vision-colors question with its image (the same files, `../vision-colors/data/images/`), the
right colour as the chosen answer and another of the four colours as the rejected one. The prompt is the same
sentence in every row, so a policy blind to the image cannot prefer the right colour more often than by
chance: what DPO or KTO learns here it learns from the image. Rows are preference rows in chat form (prompt,
chosen and rejected as message lists), the image an OpenAI `image_url` part holding a path relative to this
recipe's data folder.

Deterministic (seeded); run by hand from anywhere, after recipes/vision-colors/make_data.py:
    python recipes/vision-colors-dpo/make_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "vision-colors" / "data"
COLOURS = ("red", "green", "blue", "yellow")
# vision-colors' paths are relative to its data folder; these rows live in ours
TO_SOURCE = "../../vision-colors/data/"


def preference_row(chat: dict, rng: random.Random) -> dict:
    user, answer = chat["messages"]
    content = [{**part, "image_url": {"url": TO_SOURCE + part["image_url"]["url"]}}
               if part.get("type") == "image_url" else part for part in user["content"]]
    wrong = rng.choice([c for c in COLOURS if c != answer["content"]])
    return {"prompt": [{"role": "user", "content": content}],
            "chosen": [{"role": "assistant", "content": answer["content"]}],
            "rejected": [{"role": "assistant", "content": wrong}]}


def main() -> None:
    rng = random.Random(0)
    (HERE / "data").mkdir(exist_ok=True)
    for split in ("train", "eval"):
        chats = [json.loads(line)
                 for line in (SOURCE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        with open(HERE / "data" / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for chat in chats:
                f.write(json.dumps(preference_row(chat, rng)) + "\n")
        print(f"wrote {len(chats)} {split} pairs to {HERE / 'data' / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
