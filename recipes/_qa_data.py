"""The shared construction of the bundled Q&A data sets (support-bot, it-helpdesk, bike-shop).

A set is a system prompt and a list of intents, each with ONE canonical answer and ten hand-written user
questions. Eval holds out one or two of those questions per intent (alternately); train gets the rest plus a
few style variants (casing, greetings, typos) of its own questions, so the two files share intents and
answers but never a question. About 10% of train rows are two-turn chats. Rows are in the OpenAI chat
fine-tuning format, and the same on every call (seeded with `random.Random(0)`).

Each recipe's make_data.py holds its facts and loads this file by path (recipes/ is not a package):
    rows = qa_data.make_rows(INTENTS, SYSTEM_PROMPT, names=("Nimbus",))
    qa_data.write(Path(__file__).resolve().parent / "data", *rows)
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

# (intent, canonical answer, user questions)
Intent = tuple[str, str, list[str]]


def make_rows(intents: list[Intent], system_prompt: str,
              names: tuple[str, ...] = ()) -> tuple[list[dict], list[dict]]:
    """The train and eval rows. `names`: words that keep their capital letter mid-sentence (product names)."""
    rng = random.Random(0)
    train_questions, eval_rows = [], []
    answers = {intent: answer for intent, answer, _ in intents}
    seen: set[str] = set()

    for i, (intent, answer, questions) in enumerate(intents):
        for q in questions:
            _claim(seen, q, intent)
        held = rng.sample(questions, 2 if i % 2 == 0 else 1)  # 1.5 eval rows per intent
        eval_rows += [_chat(system_prompt, [(q, answer)]) for q in held]
        kept = [q for q in questions if q not in held]
        variants = []
        for q in rng.sample(kept, len(kept)):
            if len(variants) == 3:
                break
            v = _style_variant(q, rng, names)
            if _norm(v) not in seen:
                _claim(seen, v, intent)
                variants.append(v)
        train_questions += [(intent, q) for q in kept + variants]

    rng.shuffle(train_questions)
    # About 10% of train rows are two-turn chats, each made of two questions from different intents;
    # every question is used once, so no row repeats another.
    train_rows, pairs = [], len(train_questions) // 11
    firsts, rest = train_questions[:pairs], train_questions[pairs:]
    for intent_a, q_a in firsts:
        j = next(k for k, (intent_b, _) in enumerate(rest) if intent_b != intent_a)
        intent_b, q_b = rest.pop(j)
        turns = [(q_a, answers[intent_a]), (_follow_up(q_b, rng, names), answers[intent_b])]
        train_rows.append(_chat(system_prompt, turns))
    train_rows += [_chat(system_prompt, [(q, answers[intent])]) for intent, q in rest]
    rng.shuffle(train_rows)
    return train_rows, eval_rows


def write(folder: Path, train_rows: list[dict], eval_rows: list[dict]) -> None:
    """Write folder/train.jsonl and folder/eval.jsonl, one JSON object a line."""
    folder.mkdir(exist_ok=True)
    for name, rows in (("train.jsonl", train_rows), ("eval.jsonl", eval_rows)):
        with open(folder / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    two_turn = sum(len(r["messages"]) > 3 for r in train_rows)
    print(f"wrote {len(train_rows)} train rows ({two_turn} two-turn) and {len(eval_rows)} eval rows "
          f"to {folder}")


def _chat(system_prompt: str, turns: list[tuple[str, str]]) -> dict:
    messages = [{"role": "system", "content": system_prompt}]
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def _norm(text: str) -> str:
    # Questions that differ only in case, spacing or punctuation count as the same question.
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _claim(seen: set[str], question: str, intent: str) -> None:
    key = _norm(question)
    if key in seen:
        raise ValueError(f"question {question!r} (intent {intent}) is a duplicate of an earlier question")
    seen.add(key)


_GREETINGS = ["Hi, ", "Hello, ", "Hey, ", "Good morning, ", "Hi there, "]
_THANKS = [" Thanks!", " Thank you.", " thx", " Thanks in advance.", " Please help."]


def _style_variant(question: str, rng: random.Random, names: tuple[str, ...]) -> str:
    """The same question written differently: a greeting, a thank-you, all lowercase, or a typo."""
    style = rng.choice(["greeting", "thanks", "lower", "typo"])
    if style == "greeting":
        return rng.choice(_GREETINGS) + _decapitalize(question, names)
    if style == "thanks":
        thanks = rng.choice(_THANKS)
        if question[-1] in "?.!":
            return question + thanks
        return question + "," + thanks.lower().rstrip(".!")
    if style == "lower":
        return question.lower().rstrip("?!.")
    words = question.split()
    long_words = [k for k, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not long_words:
        return question.lower().rstrip("?!.")
    k = rng.choice(long_words)
    c = rng.randrange(1, len(words[k]) - 2)
    w = words[k]
    words[k] = w[:c] + w[c + 1] + w[c] + w[c + 2:]  # swap two neighbouring letters
    return " ".join(words)


def _follow_up(question: str, rng: random.Random, names: tuple[str, ...]) -> str:
    lead = rng.choice(["", "", "Also, ", "One more thing: ", "Another question. "])
    if question.startswith(tuple(_GREETINGS)):  # "Also, hi there, ..." reads wrong
        lead = ""
    return lead + (_decapitalize(question, names) if lead.endswith((", ", ": ")) else question)


def _decapitalize(text: str, names: tuple[str, ...]) -> str:
    # "I", names and acronyms keep their capital letter mid-sentence.
    first = re.split(r"[\s']", text, maxsplit=1)[0]
    if first == "I" or first in names or (len(first) > 1 and first.isupper()):
        return text
    return text[0].lower() + text[1:]
