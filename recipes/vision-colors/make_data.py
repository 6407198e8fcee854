"""Write the vision-colors dataset: images/*.png, data/train.jsonl and data/eval.jsonl.

Each image is a filled shape (circle, square or triangle) of one of four colours, at a random place and size
on a grey background. Every row asks the same question, "What colour is the shape?", and answers with the
colour's name: the text alone says nothing, so a model blind to the image scores at most 1/4 (always naming
one colour), and what a fine-tune learns here it learns from the image. Rows are OpenAI chat fine-tuning rows
with an `image_url` part holding the image's path, relative to the data file.

Deterministic (seeded); run by hand from anywhere:  python recipes/vision-colors/make_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 215, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTION = "What colour is the shape?"
SIZE = 64  # pixels; processors resize to their own input size
N_TRAIN, N_EVAL = 96, 24


def draw(rng: random.Random, colour: str, shape: str) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    pen = ImageDraw.Draw(image)
    side = rng.randint(SIZE // 3, SIZE * 2 // 3)
    x, y = rng.randint(0, SIZE - side), rng.randint(0, SIZE - side)
    box, fill = (x, y, x + side, y + side), COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x + side // 2, y), (x, y + side), (x + side, y + side)], fill=fill)
    return image


def rows(rng: random.Random, n: int, split: str) -> list[dict]:
    out = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % len(COLOURS)], rng.choice(SHAPES)
        name = f"images/{split}-{i:03d}-{colour}-{shape}.png"
        draw(rng, colour, shape).save(HERE / "data" / name, optimize=True)
        out.append({"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": name}},
                                         {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": colour}]})
    rng.shuffle(out)
    return out


def main() -> None:
    (HERE / "data" / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split, n in (("train", N_TRAIN), ("eval", N_EVAL)):
        with open(HERE / "data" / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows(rng, n, split):
                f.write(json.dumps(row) + "\n")
    print(f"wrote {N_TRAIN} train and {N_EVAL} eval rows under {HERE / 'data'}")


if __name__ == "__main__":
    main()
