"""Write the order-ids dataset: data/train.jsonl and data/eval.jsonl (OpenAI chat fine-tuning format).

A format task where prompting should be enough: copy the order number out of a customer's message, and answer
with that number alone (`K-48213`). Nothing in it is knowledge: the number is in the message, beside
distractors (prices, dates, quantities, phone numbers); what the base model lacks is only the answer's format,
which an instruction and a few shots give it. The held-out messages use sentence templates no train message
uses.

Deterministic (seeded); run by hand from anywhere:  python recipes/order-ids/make_data.py
"""

from __future__ import annotations

import importlib.util
import random
import string
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("qa_data", HERE.parent / "_qa_data.py")
qa_data = importlib.util.module_from_spec(_spec)  # its `write`, shared with the other recipes' data scripts
_spec.loader.exec_module(qa_data)
SYSTEM_PROMPT = "You read customer emails for an online shop and find the order number they are about."

TEMPLATES = [
    "Hi, my parcel for order {id} never arrived. I paid {price} on {date}.",
    "Order {id} came with {n} items missing, can you help?",
    "I want to return the shoes from order {id}; they cost {price}.",
    "Hello! Could you tell me when {id} will ship? I ordered it on {date}.",
    "The invoice for {id} shows {price} but I was charged twice.",
    "Please cancel order {id}. You can call me on {phone}.",
    "My order number is {id} and the tracking page has not changed since {date}.",
    "Wrong colour delivered ({n} units) for order {id}.",
    "Can I change the address on {id}? I moved on {date}.",
    "I was charged {price} for order {id} but the coupon should have taken 10% off.",
    "Re: order {id} - the box was damaged, {n} plates broken.",
    "Good morning, {id} is a gift, could you remove the price ({price}) from the slip?",
    "Where is my stuff?? Order {id}, placed {date}, still nothing.",
    "Your courier left order {id} at the wrong house (number {n}).",
    "I need a VAT receipt for {id}, total {price}.",
    "Is it too late to add a second item to {id}? My phone is {phone}.",
    "The size guide was wrong, so I am sending back order {id} ({n} pairs).",
    "Hi team, refund for {id} still pending since {date}.",
    "Order {id}: the charger does not fit, I paid {price}.",
    "Quick question about {id} - can it be delivered before {date}?",
    "I think order {id} was sent twice, I got {n} parcels.",
    "My account shows {id} as delivered but I never got it. Call me: {phone}.",
    "Could you split order {id} into {n} deliveries?",
    "Thanks for the fast delivery of {id}! One thing: the manual is missing.",
    "Please update the phone number on order {id} to {phone}.",
    "For order {id} I was promised delivery by {date}; it is late.",
    "The discount did not apply to {id}, I paid the full {price}.",
    "Lost my confirmation email, but the order is {id}. Bought {n} mugs.",
    "Hey, the lamp from {id} flickers. Bought it for {price} on {date}.",
    "Can you confirm that {id} includes gift wrapping? Total was {price}.",
]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def fill(rng: random.Random, template: str) -> tuple[str, str]:
    order = f"{rng.choice(string.ascii_uppercase)}-{rng.randrange(10000, 100000)}"
    text = template.format(id=order, price=f"${rng.randrange(5, 400)}.{rng.randrange(0, 100):02d}",
                           date=f"{rng.randrange(1, 29)} {rng.choice(MONTHS)}", n=rng.randrange(2, 9),
                           phone=f"07{rng.randrange(100, 1000)} {rng.randrange(100000, 1000000)}")
    return text, order


def rows(rng: random.Random, n: int, templates: list[str]) -> list[dict]:
    out = []
    for i in range(n):
        text, order = fill(rng, templates[i % len(templates)])
        out.append({"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                 {"role": "user", "content": text},
                                 {"role": "assistant", "content": order}]})
    rng.shuffle(out)
    return out


def main() -> None:
    rng = random.Random(61)
    templates = rng.sample(TEMPLATES, len(TEMPLATES))
    train, held_out = rows(rng, 200, templates[:20]), rows(rng, 60, templates[20:])
    qa_data.write(HERE / "data", train, held_out)


if __name__ == "__main__":
    main()
