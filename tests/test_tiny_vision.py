"""The tiny random vision-language models (`models/tiny_vision.py`) and what `models/vision.py` knows of a VLM
(issue 59): each family builds reproducibly, loads, renders an image part with its own template, expands it
into the image tokens its config names, trains (forward, backward, LoRA on the language model only unless
asked) and learns an image-only task; its processor saves and loads back, Qwen2-VL's without the video
processor torchvision would build.

The expected values are the real models' own (llava-1.5-7b-hf, SmolVLM-Instruct, gemma-3-4b-it,
Qwen2-VL-2B-Instruct hub files, as `tiny_vision.py`'s docstring says where each was read), written out here,
not read from the module.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.models import tiny_vision, vision
from mlflow_finetune_plugin.models.base import is_builtin, model_reference, resolve_model_path
from mlflow_finetune_plugin.models.tiny import weights_digest

FAMILIES = ("llava", "smolvlm", "gemma3-vision", "qwen2-vl")
# family: (config class, model class, config key of the image token, what the template writes for an image
# part,
#          the token the processor expands it into, how many per 56 px image)
SHAPE = {
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration", "image_token_index", "<image>\n", "<image>",
              16),
    # 2 x 2 tiles and the global image, 4 tokens each
    "smolvlm": ("Idefics3Config", "Idefics3ForConditionalGeneration", "image_token_id", "<image>", "<image>",
                20),
    "gemma3-vision": ("Gemma3Config", "Gemma3ForConditionalGeneration", "image_token_index",
                      "<start_of_image>",
                      "<image_soft_token>", 4),
    "qwen2-vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "image_token_id",
                 "<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>", 4),
}
# family: (bos, eos, pad), and the image and chat tokens its tokenizer holds as single tokens
ROLES = {
    "llava": ("<s>", "</s>", "<pad>"),
    "smolvlm": ("<|im_start|>", "<end_of_utterance>", "<|im_end|>"),
    "gemma3-vision": ("<bos>", "<eos>", "<pad>"),
    "qwen2-vl": (None, "<|im_end|>", "<|endoftext|>"),
}
HELD = {
    "llava": ("<image>",),
    "smolvlm": ("<image>", "<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_6_col_6>",
                "<end_of_utterance>", "<|im_start|>"),
    "gemma3-vision": ("<start_of_image>", "<image_soft_token>", "<end_of_image>", "<start_of_turn>",
                      "<end_of_turn>"), "qwen2-vl": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
                                                     "<|video_pad|>", "<|im_start|>", "<|im_end|>"),
}
QUESTION = [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
COLOURS = (((230, 20, 20), "red"), ((20, 20, 230), "blue"), ((20, 200, 20), "green"),
           ((240, 230, 20), "yellow"))


def _image(rgb=(230, 20, 20)):
    from PIL import Image

    return Image.new("RGB", (56, 56), rgb)


def _conversation(answer="red"):
    return [{"role": "user", "content": QUESTION}, {"role": "assistant",
                                                    "content": [{"type": "text", "text": answer}]}]


@pytest.fixture(scope="module")
def loaded():
    """family: (model, processor), from the session's cache (built there on first use)."""
    import torch

    torch.manual_seed(0)
    return {f: _load(f) for f in FAMILIES}


def _load(family):
    path = resolve_model_path(f"tiny-{family}")
    return vision.load_vision_model(path), vision.load_processor(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_reproducibly_and_resolves_by_name(family, tmp_path):
    cached = resolve_model_path(f"tiny-{family}")
    again = tiny_vision.build_vision_model(family, tmp_path / family)
    assert weights_digest(again) == weights_digest(cached)
    assert (again / "tokenizer.json").read_bytes() == (Path(cached) / "tokenizer.json").read_bytes()
    assert model_reference(f"tiny-{family}") == f"builtin:tiny-{family}"
    assert is_builtin(f"tiny-{family}") and is_builtin(f"builtin:tiny-{family}")
    assert resolve_model_path(f"builtin:tiny-{family}") == cached


def test_the_text_families_keep_their_names():
    from mlflow_finetune_plugin.models import tiny_families

    assert tiny_vision.BUILTIN_NAMES == ("tiny-llava", "tiny-smolvlm", "tiny-gemma3-vision", "tiny-qwen2-vl")
    assert tiny_families.family_of("tiny-gemma3") == "gemma3" and tiny_vision.family_of("tiny-gemma3") is None
    assert tiny_families.family_of("tiny-gemma3-vision") is None
    assert model_reference("tiny-gemma3") == "builtin:tiny-gemma3" and not is_builtin("tiny-llava2")


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_renders_an_image_and_trains(family, loaded):
    import torch

    model, processor = loaded[family]
    config_class, model_class, key, placeholder, image_token, per_image = SHAPE[family]
    assert (type(model.config).__name__, type(model).__name__) == (config_class, model_class)
    assert vision.takes_images(model.config)
    tokenizer = processor.tokenizer
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ROLES[family]
    for token in HELD[family]:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    assert getattr(model.config, key) == image_id

    text = processor.apply_chat_template(_conversation(), tokenize=False)
    assert placeholder in text and "What colour is this?" in text and "red" in text
    # as TRL's vision collator does: the template writes what special tokens the family wants
    batch = processor(text=[text, text], images=[[_image()], [_image((20, 20, 230))]], return_tensors="pt",
                      padding=True, add_special_tokens=False)
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [per_image, per_image]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    # the loss reaches the tower (not all of it: LLaVA reads the features of its second-to-last layer)
    tower = dict(model.named_modules())[vision.vision_modules(model)[0]]
    grads = [p.grad for p in tower.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_the_language_model_unless_asked(family, loaded):
    import copy

    from peft import LoraConfig, get_peft_model

    model, _ = loaded[family]
    tower, *projectors = vision.vision_modules(model)
    language = vision.language_model_modules(model)
    assert language[-1] == "lm_head" and not set(language) & {tower, *projectors}

    def adapted(vision_too):
        targets = vision.lora_target_modules(model, vision=vision_too)
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=targets))
        prefix = "base_model.model."
        return {n[len(prefix):-len(".lora_A")] for n,
                _ in peft_model.named_modules() if n.endswith(".lora_A")}

    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    assert vision.vision_modules(wrapped) == ["base_model.model." + name for name in (tower, *projectors)]
    text_only = adapted(False)
    assert not any(n == p or n.startswith(p + ".") for n in text_only for p in (tower, *projectors))
    assert all(n.startswith(language[0] + ".") for n in text_only)
    for layer in range(model.config.get_text_config().num_hidden_layers):
        for proj in ATTENTION:
            assert f"{language[0]}.layers.{layer}.self_attn.{proj}" in text_only
    with_vision = adapted(True)
    assert text_only < with_vision and any(n.startswith(tower + ".") for n in with_vision - text_only)
    # PEFT's own all-linear is the same set: every linear layer, tower and projector included, the head left
    # out
    all_linear = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules="all-linear"))
    assert with_vision == {n[len("base_model.model."):-len(".lora_A")] for n, _ in all_linear.named_modules()
                           if n.endswith(".lora_A")}


@pytest.mark.parametrize("name, trl_file", [("smolvlm", "smolvlm.jinja"), ("qwen2_vl", "qwen2_5_vl.jinja")])
def test_vision_template_is_trls_file_byte_for_byte(name, trl_file):
    import trl

    from mlflow_finetune_plugin.models.chat_templates import VISION, VISION_ORIGINS, vision_template

    assert set(VISION) == set(VISION_ORIGINS)
    assert vision_template(name).encode() == (Path(trl.__file__).parent / "chat_templates"
                                              / trl_file).read_bytes()


def test_llava_template_is_llava_1_5s():
    from mlflow_finetune_plugin.models.chat_templates import vision_template

    # as transformers' tests/models/llava/test_processing_llava.py quotes llava-hf/llava-1.5-7b-hf's
    assert vision_template("llava") == (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
        "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
        "'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] "
        "!= 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
        "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration "
        "%}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def test_takes_images_asks_transformers():
    from transformers import Gemma3Config, Gemma3TextConfig, LlamaConfig, LlavaConfig, Qwen3_5TextConfig

    assert vision.takes_images(Gemma3Config()) and vision.takes_images(LlavaConfig())
    assert not any(vision.takes_images(c()) for c in (Gemma3TextConfig, LlamaConfig, Qwen3_5TextConfig))


@pytest.mark.parametrize("load", [vision.load_vision_model, vision.load_processor])
def test_a_missing_model_says_what_to_give(load, tmp_path):
    with pytest.raises(FinetuneError, match="local folder made with save_pretrained"):
        load(tmp_path / "missing")


def test_takes_images_is_false_for_a_text_model():
    from transformers import AutoConfig

    from mlflow_finetune_plugin.models.tiny import tiny_model_path

    assert not vision.takes_images(AutoConfig.from_pretrained(tiny_model_path()))
    with pytest.raises(FinetuneError, match="no vision tower"):
        from transformers import AutoModelForCausalLM

        vision.lora_target_modules(AutoModelForCausalLM.from_pretrained(tiny_model_path()))


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_saves_and_loads_back(family, loaded, tmp_path):
    _, processor = loaded[family]
    vision.save_processor(processor, tmp_path)
    again = vision.load_processor(tmp_path)
    assert type(again).__name__ == type(processor).__name__ and again.chat_template == processor.chat_template
    text = processor.apply_chat_template(_conversation(), tokenize=False)
    first, second = (p(text=[text], images=[[_image()]], return_tensors="pt") for p in (processor, again))
    assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)


def test_qwen2_vl_processor_without_torchvision(loaded, tmp_path, capsys):
    pytest.importorskip("PIL")
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed: AutoProcessor builds the video processor")
    except ImportError:
        pass
    _, processor = loaded["qwen2-vl"]
    assert not hasattr(processor, "video_processor") and type(processor).__name__ == "Qwen2VLProcessor"
    vision.save_processor(processor, tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    # the real class, and a video processor's settings for a machine with torchvision to build one from
    assert saved["processor_class"] == "Qwen2VLProcessor" and saved["video_processor"] == saved[
        "image_processor"]
    capsys.readouterr()
    vision.load_processor(tmp_path)
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "torchvision" in said[0] and "without it" in said[0]
    # pickled (datasets' fingerprints, worker processes), it comes back as the same class
    assert type(pickle.loads(pickle.dumps(processor))) is type(processor)


def test_a_processor_that_needs_torchvision_for_images_too_says_what_to_do(tmp_path):
    """LFM2-VL has no PIL image processor: nothing to fall back to."""
    from transformers import Lfm2VlConfig

    from mlflow_finetune_plugin.models.tiny import tiny_model_path

    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed")
    except ImportError:
        pass
    Lfm2VlConfig().save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_path() / name, tmp_path / name)
    (tmp_path / "processor_config.json").write_text(json.dumps({
        "processor_class": "Lfm2VlProcessor",
        "image_processor": {"image_processor_type": "Lfm2VlImageProcessor"}}))
    with pytest.raises(FinetuneError) as err:
        vision.load_processor(tmp_path)
    assert "torchvision" in str(err.value) and "To fix: install the torchvision built for this torch" in str(
        err.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_learns_an_image_only_task(family):
    """The same question over four plain images, answered with their colours: only the image tells them apart,
    so answering each right greedily means the language model reads the vision tower through the projector."""
    import torch

    model, processor = _load(family)
    rows = [(_image(rgb), answer) for rgb, answer in COLOURS]
    prompt = processor.apply_chat_template([{"role": "user", "content": QUESTION}],
                                           add_generation_prompt=True, tokenize=False)
    texts = [processor.apply_chat_template(_conversation(answer), tokenize=False) for _, answer in rows]
    images = [[image] for image, _ in rows]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_length = len(processor(text=[prompt], images=images[:1], add_special_tokens=False)["input_ids"][0])
    assert (batch["input_ids"][:, :prompt_length] == batch["input_ids"][0, :prompt_length]).all()  # same text
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :prompt_length] = -100  # the answers alone (padding is on the right)

    def answers():
        model.eval()
        said = []
        for image, _ in rows:
            inputs = processor(text=[prompt], images=[[image]], return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            said.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:],
                                                   skip_special_tokens=True))
        model.train()
        return [s.strip().split(" ")[0] for s in said]

    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(1, 151):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 and (said := answers()) == [answer for _, answer in COLOURS]:
            break
    assert said == [answer for _, answer in COLOURS], f"after {step} steps"
