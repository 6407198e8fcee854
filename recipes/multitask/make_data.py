"""Write the multitask data: three support tasks over the same fictional product (Nimbus Notes).

  answer   -- reuses ../support-bot/data (chat format): answer the customer's question
  intent   -- data/intent_{train,eval}.jsonl (alpaca format): name the intent of a customer message
  extract  -- data/extract_{train,eval}.jsonl (prompt/completion format): pull the order number and email out
  of a
              message as JSON

Three formats on purpose: each task keeps its own, the mixture renders them all with the chat template.
Deterministic (seeded); run by hand from anywhere:  python recipes/multitask/make_data.py
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

INTENT_INSTRUCTION = "Classify the intent of this customer message. Reply with the intent label only."
EXTRACT_PROMPT = ("Extract the order number and the email address from this message as JSON with the keys "
                  "order_id and email.\n\n{message}")
NAMES = ["ana", "ben", "chloe", "dev", "emma", "farid", "grace", "hugo", "ines", "jonas", "kira", "liam",
         "mei", "noah", "olga", "pablo", "quinn", "rosa", "sami", "tara"]
DOMAINS = ["example.com", "mail.example", "inbox.example.org", "post.example.net"]
TEMPLATES = [
    "Hi, my order {order} was charged twice. Please reply to {email}.",
    "Order #{order} never arrived. You can reach me at {email}",
    "I need an invoice for order {order}, send it to {email} please",
    "hello, can you refund order no. {order}? my email is {email}",
    "Please change the billing name on order {order}. Contact: {email}",
    "{email} here - order {order} shows the wrong plan.",
]


def intent_rows(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Every support-bot question labelled with its intent; two questions per intent held out."""
    train, held = [], []
    for intent, _answer, questions in support_bot.INTENTS:
        picked = set(rng.sample(range(len(questions)), 2))
        for i, q in enumerate(questions):
            row = {"instruction": INTENT_INSTRUCTION, "input": q, "output": intent}
            (held if i in picked else train).append(row)
    rng.shuffle(train)
    return train, held


def extract_rows(rng: random.Random, n: int) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < n:
        order = str(rng.randint(10000, 99999))
        email = f"{rng.choice(NAMES)}{rng.randint(1, 99)}@{rng.choice(DOMAINS)}"
        if order in seen:
            continue
        seen.add(order)
        message = rng.choice(TEMPLATES).format(order=order, email=email)
        rows.append({"prompt": EXTRACT_PROMPT.format(message=message),
                     "completion": json.dumps({"order_id": order, "email": email})})
    return rows


def main() -> None:
    rng = random.Random(0)
    out = HERE / "data"
    out.mkdir(exist_ok=True)
    intent_train, intent_eval = intent_rows(rng)
    extract = extract_rows(rng, 240)
    files = {"intent_train": intent_train, "intent_eval": intent_eval,
             "extract_train": extract[:200], "extract_eval": extract[200:]}
    for name, rows in files.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(", ".join(f"{name}: {len(rows)} rows" for name, rows in files.items()), f"-> {out}")


if __name__ == "__main__":
    main()
