"""The shots of the few-shot and retrieval contenders: which train conversations, how many fit the model's
context (a vision-language model's images counted as the image tokens its processor makes of them), and
whether they keep their images.

A vision-language model whose chat template or processor refuses several images in one prompt
(`models.image_limits.several_images`) gets its shots without their images: each shot's text stays (the
question and the answer, as an example of the answer's form), the prompt's own images stay, and the run says
why once.
"""

from __future__ import annotations

import json
import random

from mlflow_finetune_plugin.messages import fewshot_prompt, split_conversation
from mlflow_finetune_plugin.models.chat_format import prompt_ids
from mlflow_finetune_plugin.models.image_inputs import has_image_parts, is_image_part


def pick_shots(train_conversations, k: int, exclude: set[str]) -> list[list[dict]]:
    """k train conversations (seeded, so every run of a recipe sees the same), none equal to an eval
    prompt."""
    if k <= 0:
        return []
    pool = [conv for conv in train_conversations
            if (pair := split_conversation(conv)) and pair[0] and json.dumps(pair[0]) not in exclude]
    return random.Random(0).sample(pool, min(k, len(pool)))


def fit(tokenizer, messages, prompt, shots, limit: int) -> list[dict]:
    """Drop shots until the few-shot prompt leaves room for the answer in the model's context."""
    while shots and prompt_length(tokenizer, messages) > limit:
        shots = shots[:-1]
        messages = fewshot_prompt(prompt, shots)
    return messages


def prompt_length(tokenizer, messages) -> int:
    """The prompt's tokens as the model reads them: for a vision-language model's prompt with images, the
    processor's ids, each image expanded to its image tokens (a shot's image costs as much context as the
    question's)."""
    if not has_image_parts(messages):
        return len(prompt_ids(tokenizer, messages))
    from mlflow_finetune_plugin.models.image_inputs import prompt_inputs, read_image, with_placeholders
    from mlflow_finetune_plugin.models.vision import processor_of

    processor = processor_of(tokenizer)
    if processor is None:
        return len(prompt_ids(tokenizer, messages))
    placed, refs = with_placeholders(messages)
    return int(prompt_inputs(processor, tokenizer, [placed],
                             [[read_image(r) for r in refs]])["input_ids"].shape[1])


def shots_for_model(tokenizer, shots: list[list[dict]], retrieved: list[list[list[dict]]]) -> tuple[list,
                                                                                                    list]:
    """(few-shot shots, retrieved shots per question) as the model takes them: without their images where its
    chat template or processor refuses several images in one prompt (printed once, with the reason); as they
    are for a text model, or one that takes several."""
    from mlflow_finetune_plugin.models.image_limits import several_images
    from mlflow_finetune_plugin.models.vision import processor_of

    processor = processor_of(tokenizer)
    if processor is None or not any(has_image_parts(m) for m in [*shots, *(s for r in retrieved for s in r)]):
        return shots, retrieved
    why = several_images(processor, tokenizer)
    if why is None:
        return shots, retrieved
    print(
        "Few-shot and retrieval contenders: the shots go without their images, only the question's own "
        f"image is sent: this model takes one image per prompt ({why})")
    return [without_images(s) for s in shots], [[without_images(s) for s in r] for r in retrieved]


def without_images(conversation: list[dict]) -> list[dict]:
    """The conversation with its image parts left out (text parts stay)."""
    return [{**m, "content": [p for p in m["content"] if not is_image_part(p)]}
            if isinstance(m.get("content"), list) else m for m in conversation]
