"""Messages with images as a vision-language model's inputs: for answering (evaluation, `predict`, serving)
and for scoring a reference answer. Training's batches are built the same way (`data/image_rows.py`).

The chat template renders each image part as the family's placeholder (`<image>`, `<start_of_image>`,
`<|vision_start|><|image_pad|><|vision_end|>`); the processor expands each placeholder into the image's tokens
and computes the pixel inputs. The turns (what is prompt, what is answer) come from `chat_format`, as for
text.

An image part of a message may hold its image (`{"type": "image", "image": PIL | path | data URL}`, OpenAI's
`{"type": "image_url", "image_url": {"url": ...}}`, transformers' `path`/`url`/`base64` keys) or be a bare
placeholder (`{"type": "image"}`) whose image comes in a list beside the messages. `read_image` reads a
reference (a path, a data URL, an http URL) into a PIL image; the rest of this module takes images, not
references.
"""

from __future__ import annotations

import difflib

_IMAGE_TYPES = ("image", "image_url", "input_image")
_REF_KEYS = ("image", "url", "path", "base64")


def is_image_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") in _IMAGE_TYPES


def part_reference(part: dict):
    """The image an image part holds (a PIL image or a reference string), or None for a bare placeholder."""
    value = part.get("image_url")
    if isinstance(value, dict):
        return value.get("url")
    if isinstance(value, str):
        return value
    for key in _REF_KEYS:
        if part.get(key) is not None:
            ref = part[key]
            return ("data:image/png;base64,"
                    f"{ref}") if key == "base64" and not str(ref).startswith("data:") else ref
    return None


def with_placeholders(messages: list[dict], images=()) -> tuple[list[dict], list]:
    """(messages with every image part a bare `{"type": "image"}` placeholder, the images in order): an image
    part's own image, else the next of `images` (the row's `images` column)."""
    given, out, found = list(images or []), [], []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list) or not any(is_image_part(p) for p in content):
            out.append(m)
            continue
        parts = []
        for part in content:
            if is_image_part(part):
                ref = part_reference(part)
                found.append(ref if ref is not None else (given.pop(0) if given else None))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        out.append({**m, "content": parts})
    return out, found


def with_images(messages: list[dict], images) -> list[dict]:
    """`messages` whose bare image placeholders hold their images (the row's `images`, in order): a
    conversation that carries its own images, as evaluation's shots and prompts do."""
    given, out = list(images or []), []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for part in content:
            if is_image_part(part) and part_reference(part) is None and given:
                part = {"type": "image", "image": given.pop(0)}
            parts.append({k: v for k, v in part.items() if v is not None} if isinstance(part, dict) else part)
        out.append({**m, "content": parts})
    return out


def has_image_parts(messages: list[dict]) -> bool:
    return any(isinstance(m.get("content"), list) and any(is_image_part(p) for p in m["content"])
               for m in messages)


def aligned_labels(text_ids: list[int], mask: list[int], expanded: list[int]) -> list[int]:
    """Labels for the processor's `expanded` ids: the id where the aligned text token is trained (mask 1),
    else -100. The processor only inserts image tokens into the text's tokens, so each text token finds its
    place (`difflib`). ValueError when a trained token does not (the processor changed the text around it)."""
    labels = [-100] * len(expanded)
    matcher = difflib.SequenceMatcher(None, text_ids, expanded, autojunk=False)
    placed = 0
    for a, b, n in matcher.get_matching_blocks():
        for k in range(n):
            if mask[a + k]:
                labels[b + k] = expanded[b + k]
                placed += 1
    if placed != sum(mask):
        raise ValueError(
            f"{sum(mask) - placed} of the row's {sum(mask)} trained tokens are not in the processor's "
            "tokens: the processor changes the text of the answer")
    return labels


def prompt_inputs(processor, tokenizer, prompts: list[list[dict]], images: list[list], device=None):
    """The processor's inputs for `prompts` (placeholders, with the generation prompt), left-padded as one
    batch."""
    from mlflow_finetune_plugin.models.chat_format import render

    texts = [render(tokenizer, p, add_generation_prompt=True) for p in prompts]
    enc = processor(text=texts, images=images if any(images) else None, padding=True, padding_side="left",
                    return_tensors="pt", add_special_tokens=False)
    return enc.to(device) if device is not None else enc


def generate_answers(model, tokenizer, processor, prompts: list[list[dict]], images: list[list],
                     max_new_tokens: int, num_beams: int = 1, **generate_kwargs) -> list[str]:
    """Greedy (or beam-search; `do_sample=True` in `generate_kwargs` samples) answers to `prompts` with their
    images, as users read them (`answers.answer_text`)."""
    import torch

    from mlflow_finetune_plugin.models.answers import answer_text
    from mlflow_finetune_plugin.models.chat_format import stop_ids

    enc = prompt_inputs(processor, tokenizer, prompts, images, model.device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=int(max_new_tokens), num_beams=num_beams,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=stop_ids(tokenizer, model.generation_config),
                             **{"do_sample": False, **generate_kwargs})
    return [answer_text(tokenizer, row.tolist()) for row in out[:, enc["input_ids"].shape[1]:]]


def reference_nll(model, tokenizer, processor, prompts: list[list[dict]], images: list[list],
                  references: list[str]) -> tuple[float, int]:
    """The summed negative log-likelihood of each reference answer after its prompt and images, and its token
    count, one row at a time (the reply's tokens as training trains them, image tokens never counted)."""
    import torch

    from mlflow_finetune_plugin.models.chat_format import last_turn
    from mlflow_finetune_plugin.models.turn_spans import span_mask

    total, count = 0.0, 0
    for prompt, row_images, reference in zip(prompts, images, references):
        prompt_text, completion = last_turn(tokenizer, prompt, {"role": "assistant", "content": reference})
        text = prompt_text + completion
        plain = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = span_mask(plain["offset_mapping"], [(len(prompt_text), len(text), None)])
        enc = processor(text=[text], images=[row_images] if row_images else None, return_tensors="pt",
                        add_special_tokens=False)
        labels = aligned_labels(list(plain["input_ids"]), mask, enc["input_ids"][0].tolist())
        enc = enc.to(model.device)
        with torch.no_grad():
            logits = model(**enc).logits[0, :-1].float()
        target = torch.tensor(labels[1:], device=logits.device)
        keep = target != -100
        if keep.any():
            total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    return total, count


def open_image(ref: str):
    """The image a reference names, opened but not decoded (PIL reads its header only): a local path (or
    `file://` URL), a `data:` URL, or an `http(s)://` URL (fetched). What PIL, base64 and urllib raise goes
    through."""
    import base64
    import io

    from PIL import Image

    if ref.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode("".join(ref.split(",", 1)[1].split()))))
    if ref[:8].lower().startswith(("http://", "https:/")):
        import urllib.request

        with urllib.request.urlopen(ref, timeout=30) as response:  # noqa: S310 - the user's own image URL
            return Image.open(io.BytesIO(response.read()))
    return Image.open(ref[len("file://"):] if ref.startswith("file://") else ref)


def read_image(ref):
    """A PIL image (RGB) from an image reference: a PIL image, or what `open_image` opens, decoded whole.
    FileNotFoundError / ValueError (undecodable, its cause the library's error) name the reference."""
    if hasattr(ref, "convert"):
        return ref.convert("RGB")
    ref = str(ref)
    shown = ref if len(ref) < 80 else ref[:60] + "..."
    try:
        with open_image(ref) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image {shown!r} not found") from None
    except Exception as e:  # noqa: BLE001 - PIL, base64 and urllib raise many types for one answer: unusable
        raise ValueError(f"image {shown!r} cannot be decoded ({e})") from e
