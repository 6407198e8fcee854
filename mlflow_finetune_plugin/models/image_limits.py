"""What a vision-language model's processor does with images, asked of the processor and its chat template,
never of a list of families: the size it resizes images to (`resize_limit`), and whether one prompt may hold
several images (`several_images`).

- The size: an image processor's `size` says how it resizes (transformers' `SizeDict`): to `height`×`width`;
the short
  side to `shortest_edge` (CLIP, LLaVA-1.5; then a centre crop); the long side to `longest_edge` (Idefics3,
  SmolVLM). Processors whose kwargs include `max_pixels` (Qwen2/2.5/3-VL, GLM-4V) hold pixel counts there
  instead: an image of more than `longest_edge` pixels is scaled down to about that many.
- Several images: a conversation of two turns, each with an image, rendered by the chat template and given to
the
  processor with two small images. A template that raises on it, or a processor that refuses it, is the answer
  (their own words are the reason); whether the model was *trained* on several images is not asked (LLaVA-1.5
  was not).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from mlflow_finetune_plugin.models.vision import first_line

_SEVERAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ResizeLimit:
    text: str            # what the processor resizes to, as the run says it ("56 px on the short side")
    side: str = ""       # "height_width", "short", "long" or "pixels"
    height: int = 0
    width: int = 0
    edge: int = 0        # a side's length in px, or a pixel count for "pixels"

    def larger(self, width: int, height: int) -> bool:
        """Whether an image of `width`×`height` px is larger than the processor's size (it is scaled down)."""
        if self.side == "height_width":
            return width > self.width or height > self.height
        if self.side == "short":
            return min(width, height) > self.edge
        if self.side == "long":
            return max(width, height) > self.edge
        return width * height > self.edge


def resize_limit(processor) -> ResizeLimit | None:
    """The size `processor` (a processor, or its image processor) resizes images to; None where it does not
    resize or its `size` says none of the ways above."""
    images = getattr(processor, "image_processor", processor)
    size = getattr(images, "size", None)
    if not getattr(images, "do_resize", True) or size is None:
        return None
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    kwargs = getattr(getattr(type(images), "valid_kwargs", None), "__annotations__", {})
    if "max_pixels" in kwargs and (get("max_pixels") or get("longest_edge")):
        pixels = get("max_pixels") or get("longest_edge")
        return ResizeLimit(f"at most {pixels} pixels (about {int(pixels ** 0.5)}×{int(pixels ** 0.5)} px)",
                           "pixels", edge=pixels)
    if get("height") and get("width"):
        return ResizeLimit(f"{get('width')}×{get('height')} px", "height_width", get("height"), get("width"))
    if get("longest_edge"):
        return ResizeLimit(f"{get('longest_edge')} px on the long side", "long", edge=get("longest_edge"))
    if get("shortest_edge"):
        crop = getattr(images, "crop_size", None) if getattr(images, "do_center_crop", False) else None
        crop = crop if isinstance(crop, dict) else vars(crop) if crop is not None else {}
        then = (
            f", then cropped to {crop['width']}×{crop['height']} px"
            if crop.get("width") and crop.get("height")
            else ""
        )
        return ResizeLimit(f"{get('shortest_edge')} px on the short side{then}", "short",
                           edge=get("shortest_edge"))
    return None


def several_images(processor, tokenizer) -> str | None:
    """None where one prompt of the model may hold several images (its chat template renders two turns with an
    image each, and its processor takes them); else why not, in the template's or the processor's words. Asked
    once per processor."""
    try:
        if processor in _SEVERAL:
            return _SEVERAL[processor]
    except TypeError:  # not weak-referenceable: asked every time
        return _ask_several(processor, tokenizer)
    _SEVERAL[processor] = _ask_several(processor, tokenizer)
    return _SEVERAL[processor]


def _ask_several(processor, tokenizer) -> str | None:
    from PIL import Image

    from mlflow_finetune_plugin.models.chat_format import render

    def turn(role: str, text: str, image: bool = False) -> dict:
        return {"role": role, "content": [{"type": "image"}] * image + [{"type": "text", "text": text}]}

    messages = [turn("user", "What is this?", True), turn("assistant", "A square."),
                turn("user", "And this?", True)]
    try:
        text = render(tokenizer, messages, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - the template's own refusal (raise_exception) is the answer
        return f"its chat template refuses two images in one conversation ({first_line(e, 200)})"
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    try:
        processor(text=[text], images=[[image, image.copy()]], return_tensors="pt", add_special_tokens=False)
    except Exception as e:  # noqa: BLE001 - the processor's own refusal is the answer
        return f"its processor refuses two images in one prompt ({first_line(e, 200)})"
    return None


