"""What a vision-language model's processor takes (issue 59): its rows counted with their image tokens by
`mlflow-finetune data check --model`, the images it scales down said once by the run, and shots without their
images where it takes one image per prompt. On the built-in tiny random VLMs (their processors, no weights
loaded where only the processor is asked)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from tests.helpers import REPO

RECIPE = REPO / "recipes" / "vision-colors"
FAMILIES = ["tiny-llava", "tiny-smolvlm", "tiny-gemma3-vision", "tiny-qwen2-vl"]
# A template written for one image per conversation, as some are: it stops on the second (jinja's
# raise_exception).
ONE_IMAGE = ("{% set seen = namespace(n=0) %}{% for message in messages %}{{ message['role'] | upper }}: "
             "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in "
             "message['content'] %}{% if part['type'] == 'image' %}{% set seen.n = seen.n + 1 %}{% if seen.n "
             "> 1 %}{{ raise_exception('this model takes one image per conversation') }}{% endif %}<image>"
             "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
             "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _tokenizer(family: str, template: str | None = None):
    from mlflow_finetune_plugin.models.base import load_tokenizer
    from mlflow_finetune_plugin.models.vision import processor_of

    tok = load_tokenizer(family)
    if template is not None:
        tok.chat_template = processor_of(tok).chat_template = template
    return tok


def _data(tmp_path: Path) -> Path:
    return Path(shutil.copytree(RECIPE / "data", tmp_path / "data"))


def _check(*args) -> tuple[int, list[dict]]:
    from mlflow_finetune_plugin.cli import main

    result = CliRunner().invoke(main, ["data", "check", *args, "--json"])
    return result.exit_code, json.loads(result.output[result.output.index("[\n"):])


# ---------------------------------------------------------------- the data check counts image tokens


def test_data_check_counts_image_tokens_as_the_pre_run_check_does_and_refuses_long_rows(tmp_path):
    """The same counts as training's check before its first step (VisionCollator.check), from the processor
    alone: rows that fit the text limit but not with their image tokens are errors with their line and the
    fix."""
    from mlflow_finetune_plugin.data.image_rows import VisionCollator
    from mlflow_finetune_plugin.data.read import load_training_dataset
    from mlflow_finetune_plugin.models.vision import processor_of

    data = _data(tmp_path)
    train = str(data / "train.jsonl")
    code, [report] = _check(train, "--model", "tiny-llava", "--max-length", "1024")
    assert code == 0 and not report["errors"], report["errors"]
    assert report["images"]["image_tokens"] == "tiny-llava"
    tok = _tokenizer("tiny-llava")
    ds, _ = load_training_dataset(train)
    out = VisionCollator(processor_of(tok), tok)([ds[i] for i in range(len(ds))])
    lengths = out["attention_mask"].sum(dim=1).tolist()
    assert report["token_stats"]["max"] == max(lengths) and report["token_stats"]["min"] == min(lengths)
    limit = max(lengths) - 1
    _, [text_only] = _check(train, "--max-length", str(limit))  # no vision model: the text's tokens alone
    # the text fits: only the image tokens make the rows too long
    assert text_only["token_stats"]["max"] < limit
    code, [report] = _check(train, "--model", "tiny-llava", "--max-length", str(limit))
    longest = [i + 1 for i, n in enumerate(lengths) if n > limit]
    assert code == 1 and sorted(e["line"] for e in report["errors"]) == longest
    assert all(f"tokens with its image tokens, more than max_length {limit}" in e["message"]
               for e in report["errors"])
    assert "raise data.max_length" in report["errors"][0]["message"]
    assert not any("cut" in w["message"] for w in report["warnings"])  # refused, not cut


def test_data_check_counts_preference_rows_with_trls_collator(capsys):
    from mlflow_finetune_plugin.data.image_rows import (
        check_preference_rows,
        checked_preference_rows,
        preference_collator,
        with_loaded_images,
    )
    from mlflow_finetune_plugin.data.read import load_training_dataset
    from mlflow_finetune_plugin.errors import FinetuneError
    from mlflow_finetune_plugin.models.vision import processor_of

    # its images are vision-colors'
    train = str(REPO / "recipes" / "vision-colors-dpo" / "data" / "train.jsonl")

    code, [report] = _check(train, "--model", "tiny-llava")
    assert code == 0 and report["format"] == "preference" and report["images"]["image_tokens"]
    longest = report["token_stats"]["max"]
    code, [report] = _check(train, "--model", "tiny-llava", "--max-length", str(longest - 1))
    assert code == 1 and report["errors"] and "with its image tokens" in report["errors"][0]["message"]
    # the pre-run check refuses the same rows
    ds, _ = load_training_dataset(train)
    collator = preference_collator(processor_of(_tokenizer("tiny-llava")), "preference")
    with pytest.raises(FinetuneError, match=rf"data.train: {len(report['errors'])} row\(s\) longer than "):
        check_preference_rows(collator, with_loaded_images(ds), longest - 1, "data.train")
    # DPO's and KTO's pre-run check: fits, says the sizes once
    checked_preference_rows(collator, longest, ds, None)
    assert capsys.readouterr().out.count("96 of 96 images are larger than the processor's size") == 1


def test_data_check_without_a_vision_model_says_image_tokens_are_not_counted(tmp_path):
    data = _data(tmp_path)
    code, [report] = _check(str(data / "train.jsonl"))
    assert code == 0 and "image_tokens" not in report["images"]


# ---------------------------------------------------------------- images larger than the processor's size


@pytest.mark.parametrize(("family", "text", "larger", "not_larger"), [
    ("tiny-llava", "56 px on the short side, then cropped to 56×56 px", (57, 300), (56, 300)),
    ("tiny-smolvlm", "112 px on the long side", (113, 10), (112, 112)),
    ("tiny-gemma3-vision", "56×56 px", (57, 56), (56, 56)),
    ("tiny-qwen2-vl", "at most 3136 pixels (about 56×56 px)", (57, 56), (112, 28)),
])
def test_resize_limit_is_read_from_the_processors_settings(family, text, larger, not_larger):
    """CLIP's shortest edge and crop, Idefics3's longest edge, Gemma 3's fixed size, Qwen2-VL's pixel
    count."""
    from mlflow_finetune_plugin.models.image_limits import resize_limit
    from mlflow_finetune_plugin.models.vision import processor_of

    limit = resize_limit(processor_of(_tokenizer(family)))
    assert limit.text == text and limit.larger(*larger) and not limit.larger(*not_larger)


def test_the_run_says_once_how_many_images_were_resized_and_to_what(tmp_path, capsys):
    """tiny-llava's processor takes 56 px on the short side: two of three rows carry larger images."""
    from datasets import Dataset

    from mlflow_finetune_plugin.data.image_rows import VisionCollator
    from mlflow_finetune_plugin.models.vision import processor_of

    tok = _tokenizer("tiny-llava")
    rows = []
    for i, size in enumerate([(40, 40), (300, 200), (64, 900)]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", size, (200, 20, 20)).save(path)
        rows.append({"messages": [{"role": "user", "content": [{"type": "image"},
                                                               {"type": "text", "text": "Colour?"}]},
                                  {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
                     "images": [str(path)]})
    collator = VisionCollator(processor_of(tok), tok)
    collator.check(Dataset.from_list(rows), "data.train")
    assert collator.sizes.larger() == (2, 3)
    assert collator.sizes.note() == (
        "2 of 3 images are larger than the processor's size: resized down to 56 px on the "
        "short side, then cropped to 56×56 px before they reach the model (downscale "
        "them beforehand to save reading time)")


def test_a_training_run_prints_the_resized_images_once(tmp_path, tracking_uri):
    """The recipe's 64 px images against tiny-llava's 56 px: the run says it once, before its first step (the
    96 training rows: with eval.enabled false no held-out rows are checked)."""
    import contextlib

    from tests.helpers import train_in_process

    project = Path(shutil.copytree(RECIPE, tmp_path / "vision-colors"))
    log = tmp_path / "out.txt"

    with open(log, "w") as out, contextlib.redirect_stdout(out):
        code, run = train_in_process(project, tmp_path, {"train.max_steps": "1", "eval.enabled": "false"},
                                     "vision-resized")
    assert code == 0, log.read_text()
    said = [line for line in log.read_text().splitlines() if "larger than the processor's size" in line]
    assert said == [
        "96 of 96 images are larger than the processor's size: resized down to 56 px on the short side, "
        "then cropped to 56×56 px before they reach the model (downscale them beforehand to save reading "
        "time)"], said


# ---------------------------------------------------------------- several images in one prompt


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tiny_vlms_take_several_images_in_one_prompt(family):
    from mlflow_finetune_plugin.models.image_limits import several_images
    from mlflow_finetune_plugin.models.vision import processor_of

    tok = _tokenizer(family)
    assert several_images(processor_of(tok), tok) is None


def test_a_template_for_one_image_says_so_in_its_own_words():
    from mlflow_finetune_plugin.models.image_limits import several_images
    from mlflow_finetune_plugin.models.vision import processor_of

    tok = _tokenizer("tiny-llava", ONE_IMAGE)
    why = several_images(processor_of(tok), tok)
    assert why.startswith("its chat template refuses two images") and "one image per conversation" in why


def test_a_processor_that_refuses_several_images_says_so():
    from mlflow_finetune_plugin.models.image_limits import several_images
    from mlflow_finetune_plugin.models.vision import processor_of

    tok = _tokenizer("tiny-gemma3-vision")
    real = processor_of(tok)

    class OneImage:  # a processor whose __call__ checks the images per prompt, as ShieldGemma 2's does
        def __call__(self, text, images, **kwargs):
            if any(len(found) > 1 for found in images):
                raise ValueError("at most one image per sample")
            return real(text=text, images=images, **kwargs)

    assert (
        several_images(OneImage(), tok)
        == "its processor refuses two images in one prompt (at most one image "
        "per sample)"
    )


@pytest.mark.parametrize("template", [None, ONE_IMAGE], ids=["several", "one-image"])
def test_fewshot_and_retrieval_shots_keep_their_images_only_where_the_model_takes_several(template, tmp_path,
                                                                                          capsys):
    """End to end on tiny-llava: the few-shot and retrieval contenders answer; with a template for one image,
    their shots go as text and the run says why; else every shot carries its image."""
    from mlflow_finetune_plugin.config.schema import EvalConfig
    from mlflow_finetune_plugin.data.read import load_training_dataset
    from mlflow_finetune_plugin.evaluate.contenders import conversations, run_evaluation
    from mlflow_finetune_plugin.models.base import resolve_model_path
    from mlflow_finetune_plugin.models.image_inputs import has_image_parts
    from mlflow_finetune_plugin.models.vision import load_vision_model

    tok = _tokenizer("tiny-llava", template)
    model = load_vision_model(resolve_model_path("tiny-llava")).eval()
    train, _ = load_training_dataset(str(RECIPE / "data" / "train.jsonl"))
    held_out, _ = load_training_dataset(str(RECIPE / "data" / "eval.jsonl"))
    cfg = EvalConfig(max_examples=2, max_new_tokens=2, fewshot_k=2, traces=False, forgetting=False)
    shots = conversations(train.select(range(8)))
    # questions that differ from the held-out one: retrieval leaves equal ones out
    for i, conv in enumerate(shots):
        conv[0]["content"] = [p if p["type"] == "image" else {"type": "text", "text": f"Colour of shape {i}?"}
                              for p in conv[0]["content"]]
    result = run_evaluation(model, tok, conversations(held_out), shots, cfg, base_model=model)
    assert {"fewshot", "retrieval", "base", "tuned"} <= set(result.contenders)
    # the cost columns count each prompt's image tokens, as the processor expands them, not its text alone
    from mlflow_finetune_plugin.messages import split_conversation
    from mlflow_finetune_plugin.models.chat_format import prompt_ids

    questions = [split_conversation(c)[0] for c in conversations(held_out)[:2]]
    text_only = sum(len(prompt_ids(tok, q)) for q in questions) / 2
    assert result.metrics["eval/base/prompt_tokens"] > text_only + 10
    shots = result.fewshot_examples + [s for r in result.retrieval_shots for s in r]
    said = "the shots go without their images" in capsys.readouterr().out
    if template is None:
        assert all(has_image_parts(s) for s in shots) and not said
    else:
        assert not any(has_image_parts(s) for s in shots) and said
        assert all(s[-1]["content"] for s in shots)  # each shot keeps its answer


def test_shot_trimming_counts_each_shots_image_tokens():
    """The few-shot prompt must leave room for the answer: a vision-language model's shots are counted with
    their images' tokens (the processor's expansion), so shots whose text fits but whose images do not are
    dropped."""
    from mlflow_finetune_plugin.data.read import load_training_dataset
    from mlflow_finetune_plugin.evaluate.contenders import conversations
    from mlflow_finetune_plugin.evaluate.shots import fit, prompt_length
    from mlflow_finetune_plugin.messages import fewshot_prompt, split_conversation
    from mlflow_finetune_plugin.models.chat_format import prompt_ids

    tok = _tokenizer("tiny-llava")
    train, _ = load_training_dataset(str(RECIPE / "data" / "train.jsonl"))
    convs = conversations(train.select(range(3)))
    question, shots = split_conversation(convs[0])[0], convs[1:3]
    full = fewshot_prompt(question, shots)
    text_tokens, model_tokens = len(prompt_ids(tok, full)), prompt_length(tok, full)
    per_image = (model_tokens - text_tokens) // 3  # the question's image and one per shot
    assert per_image > 10 and model_tokens - text_tokens == 3 * per_image
    assert prompt_length(tok, question) == len(prompt_ids(tok, question)) + per_image
    # room for the text of both shots (a text-only count keeps them), not for their images: shots go until it
    # fits
    limit = text_tokens + per_image
    kept = fit(tok, full, question, shots, limit)
    assert kept in (fewshot_prompt(question, shots[:1]), question) and prompt_length(tok, kept) <= limit
    assert fit(tok, full, question, shots, prompt_length(tok, question)) == question


def test_the_pre_run_check_refuses_rows_too_long_with_their_image_tokens_before_any_run(tmp_path):
    """`mlflow run` on a vision-language model's recipe: its data is counted with the processor's image tokens
    before any run exists (no weights loaded), so a max_length the text fits but the images do not is refused
    there."""
    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.data.check import check_data
    from mlflow_finetune_plugin.data.preflight import check_recipe_data
    from mlflow_finetune_plugin.errors import FinetuneError

    shutil.copytree(RECIPE, tmp_path / "recipe")
    code, [report] = _check(str(RECIPE / "data" / "train.jsonl"), "--model", "tiny-llava", "--max-length",
                            "1024")
    limit = report["token_stats"]["max"] - 1
    check_recipe_data(load_recipe(tmp_path / "recipe"), check_data)  # fits at the recipe's max_length
    with pytest.raises(FinetuneError,
                       match=f"longer than max_length {limit} with their image tokens \\(tiny-llava"):
        check_recipe_data(load_recipe(tmp_path / "recipe", overrides={"data.max_length": limit}), check_data)
