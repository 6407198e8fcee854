"""Write the review-sentiment dataset: data/train.jsonl and data/eval.jsonl (OpenAI chat fine-tuning format).

The sentiment of a short product review, answered with one word, `positive` or `negative`. A chat model knows
what a glowing or an angry review reads like; what it does not know unprompted is the answer's format (one
lower-case word, no explanation). Expected to be a task where a prompt matches a fine-tune; on smollm2 it is
not (finetune.yaml).

Reviews are built from sentence parts; the held-out reviews use products and sentences that no train review
uses, so the evaluation asks about sentiment, not about memorized phrases.

Deterministic (seeded); run by hand from anywhere:  python recipes/review-sentiment/make_data.py
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("qa_data", HERE.parent / "_qa_data.py")
qa_data = importlib.util.module_from_spec(_spec)  # its `write`, shared with the other recipes' data scripts
_spec.loader.exec_module(qa_data)
SYSTEM_PROMPT = "You label the sentiment of customer reviews for an online shop."

PRODUCTS = ["kettle", "backpack", "desk lamp", "phone case", "blender", "rain jacket", "office chair",
            "headphones", "frying pan", "yoga mat", "coffee grinder", "water bottle", "keyboard", "tent",
            "toaster", "umbrella", "running shoes", "bike light", "suitcase", "electric toothbrush",
            "air fryer", "wall clock", "sleeping bag", "webcam"]

POSITIVE = [
    "It works exactly as described.", "Setup took two minutes and it has been flawless since.",
    "The build quality is excellent for the price.", "I use it every day and I love it.",
    "Delivery was fast and the packaging was neat.", "It feels solid and well made.",
    "My whole family is impressed with it.", "Best purchase I have made this year.",
    "It is quiet, quick and easy to clean.",
    "Customer service answered within an hour and sorted everything.", "Still going strong after six months.",
    "Looks even better in person than in the photos.", "Great value, I would happily buy it again.",
    "It does the job perfectly.", "Comfortable, light and very sturdy.",
    "Exceeded my expectations in every way.", "The battery lasts for days.",
    "Simple to use and it just works.", "I have already recommended it to three friends.",
    "A lovely design and great materials.", "Works brilliantly, no complaints at all.",
    "Really pleased with how well it performs.",
]

NEGATIVE = [
    "It stopped working after a week.", "The handle snapped the first time I used it.",
    "Cheap plastic that feels like it will break any moment.", "It arrived scratched and missing a part.",
    "Returned it the next day.", "Complete waste of money.",
    "It is far louder than the listing claims.",
    "The instructions were useless and it never worked properly.",
    "Customer service ignored my emails for two weeks.", "It leaks every single time.",
    "The colour faded after one wash.", "Much smaller and flimsier than the photos suggest.",
    "I regret buying it.", "The battery dies within an hour.", "It overheats and smells of burning plastic.",
    "Do not buy this, it fell apart.", "Very disappointed with the quality.",
    "It broke on the second day and the refund took a month.", "Uncomfortable and badly stitched.",
    "Nothing about it works as advertised.", "The zip jammed on the first trip.",
    "Poorly made and overpriced.",
]

OPENERS = ["", "", "Bought this {product} last month. ", "I got the {product} as a gift. ",
           "Ordered the {product} for my flat. ", "Our old {product} died, so I tried this one. ",
           "Second {product} I have owned from this shop. ", "About the {product}: "]
CLOSERS = {"positive": ["", "", " Five stars.", " Highly recommended!", " Very happy."],
           "negative": ["", "", " One star.", " Avoid.", " Not happy at all."]}


def review(rng: random.Random, label: str, products: list[str], sentences: list[str]) -> str:
    product = rng.choice(products)
    body = " ".join(rng.sample(sentences, rng.choice([1, 2, 2])))
    return (rng.choice(OPENERS).format(product=product) + body + rng.choice(CLOSERS[label])).strip()


def rows(rng: random.Random, n: int, products: list[str], positive: list[str],
         negative: list[str]) -> list[dict]:
    """`n` distinct reviews, half of each label."""
    out, seen = [], set()
    while len(out) < n:
        label = "positive" if len(out) % 2 == 0 else "negative"
        text = review(rng, label, products, positive if label == "positive" else negative)
        if text in seen:
            continue
        seen.add(text)
        out.append({"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                 {"role": "user", "content": f"Review: {text}"},
                                 {"role": "assistant", "content": label}]})
    rng.shuffle(out)
    return out


def main() -> None:
    rng = random.Random(61)
    # Held-out products and sentences are never in train: a third of each list.
    products, positive, negative = (rng.sample(items, len(items)) for items in (PRODUCTS, POSITIVE, NEGATIVE))
    cut_p, cut_s = len(products) * 2 // 3, len(positive) * 2 // 3
    train = rows(rng, 200, products[:cut_p], positive[:cut_s], negative[:cut_s])
    held_out = rows(rng, 60, products[cut_p:], positive[cut_s:], negative[cut_s:])
    seen, unique = {r["messages"][1]["content"] for r in train}, []
    for row in held_out:  # a held-out review that is also a train review would test memory, not sentiment
        if row["messages"][1]["content"] not in seen:
            unique.append(row)
    qa_data.write(HERE / "data", train, unique)


if __name__ == "__main__":
    main()
