"""Images in training data (issue 59): every form users write them in read into the one canonical form (parts
with {"type": "image"} placeholders and an `images` column of absolute paths, data URLs or http URLs), and the
data check and pre-flight refusing what training could not use, by file and line, before any model loads."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.data.check import check_data
from mlflow_finetune_plugin.data.images import has_images, load_image
from mlflow_finetune_plugin.data.read import DataError, load_training_dataset
from mlflow_finetune_plugin.data.token_check import model_takes_images
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.messages import image_count, text_of
from tests.helpers import jsonl

IMG = {"type": "image"}


def png(path: Path, size=(8, 6), color=(255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def answer(t: str) -> dict:
    return {"role": "assistant", "content": [text(t)]}


def load(path):
    ds, _ = load_training_dataset(str(path))
    return ds


# ---------------------------------------------------------------- the forms


def test_openai_image_url_parts(tmp_path):
    """Path (relative: read from the file's folder), data URL and http URL, in the dict and the string
    form."""
    red, blue = png(tmp_path / "pics" / "red.png"), png(tmp_path / "blue.png", color=(0, 0, 255))
    rows = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "pics/red.png"}},
                        text("What colour?"),
                    ],
                },
                {"role": "assistant", "content": "Red."},
            ]
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        text("Compare"),
                        {"type": "image_url", "image_url": data_url(blue)},
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                    ],
                },
                {"role": "assistant", "content": "Blue, then unknown."},
            ]
        },
    ]
    ds = load(jsonl(tmp_path / "train.jsonl", rows))
    assert ds[0] == {"messages": [{"role": "user", "content": [IMG, text("What colour?")]}, answer("Red.")],
                     "images": [str(red)]}
    assert ds[1] == {"messages": [{"role": "user", "content": [text("Compare"), IMG, IMG]},
                                  answer("Blue, then unknown.")],
                     "images": [data_url(blue), "https://example.com/a.png"]}


def test_transformers_image_parts(tmp_path):
    """`{"type": "image", "path" | "url" | "image" | "base64": ...}`; `image` may be a path or a data URL,
    `base64` raw base64 text (written as a data URL)."""
    a, b = png(tmp_path / "a.png"), png(tmp_path / "b.png", color=(0, 255, 0))
    raw = base64.b64encode(b.read_bytes()).decode()
    parts = [{"type": "image", "path": "a.png"}, {"type": "image", "url": "http://host/x.jpg"},
             {"type": "image", "image": str(b)}, {"type": "image", "image": data_url(a)},
             {"type": "image", "base64": raw}, text("Four pictures?")]
    ds = load(jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": parts},
                                                          {"role": "assistant", "content": "Five."}]}]))
    assert ds[0]["messages"][0]["content"] == [IMG] * 5 + [text("Four pictures?")]
    assert ds[0]["images"] == [str(a), "http://host/x.jpg", str(b), data_url(a), data_url(b)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_trl_images_column_with_placeholders_in_every_file_type(tmp_path, suffix):
    from tests.test_data import write

    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    rows = [{"messages": [{"role": "user", "content": [IMG, text("Same?"), IMG]},
                          {"role": "assistant", "content": [text("Yes.")]}], "images": ["a.png", "b.png"]},
            {"messages": [{"role": "user", "content": [text("No picture here")]},
                          {"role": "assistant", "content": [text("Fine.")]}], "images": []}]
    ds = load(write(tmp_path / f"train{suffix}", rows))
    assert ds["images"] == [[str(tmp_path / "a.png"), str(tmp_path / "b.png")], []]
    assert ds[0]["messages"] == [{"role": "user", "content": [IMG, text("Same?"), IMG]}, answer("Yes.")]


def test_trl_single_image_column_and_string_contents(tmp_path):
    """TRL's rule for string contents with images: the images go before the first user message's text (the
    system message is left as it is); the `image` column is one image per row."""
    png(tmp_path / "a.png")
    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "What is it?"},
                          {"role": "assistant", "content": "A square."}], "image": "a.png"}]
    ds = load(jsonl(tmp_path / "t.jsonl", rows))
    assert ds.column_names == ["messages", "images"]
    assert ds[0] == {"messages": [{"role": "system", "content": [text("Be brief.")]},
                                  {"role": "user", "content": [IMG, text("What is it?")]},
                                  answer("A square.")],
                     "images": [str(tmp_path / "a.png")]}


def test_sharegpt_image_markers(tmp_path):
    """LLaMA-Factory: `<image>` in the text of `conversations` with an `images` list; each marker becomes a
    placeholder where it stands."""
    png(tmp_path / "img" / "1.png")
    png(tmp_path / "img" / "2.png")
    rows = [{"conversations": [{"from": "human", "value": "<image>Which is larger, this or <image>?"},
                               {"from": "gpt", "value": "The first."}], "images": ["img/1.png", "img/2.png"]}]
    ds, fmt = load_training_dataset(jsonl(tmp_path / "sg.jsonl", rows))
    assert fmt == "sharegpt"
    assert ds[0]["messages"] == [{"role": "user", "content": [IMG, text("Which is larger, this or "), IMG,
                                                             text("?")]}, answer("The first.")]
    assert ds[0]["images"] == [str(tmp_path / "img" / "1.png"), str(tmp_path / "img" / "2.png")]
    # LLaMA-Factory's own demo (mllm_demo.json): `messages` of {role, content} with markers; and alpaca rows
    rows = [{"messages": [{"content": "<image>Who are they?", "role": "user"},
                          {"content": "Two players.", "role": "assistant"}], "images": ["img/1.png"]}]
    ds, fmt = load_training_dataset(jsonl(tmp_path / "demo.jsonl", rows))
    assert fmt == "chat" and ds[0]["messages"][0]["content"] == [IMG, text("Who are they?")]
    rows = [{"instruction": "Describe <image>", "output": "A square.", "images": ["img/2.png"]}]
    ds, fmt = load_training_dataset(jsonl(tmp_path / "alpaca.jsonl", rows))
    assert fmt == "alpaca" and ds[0]["messages"][0]["content"] == [text("Describe "), IMG]
    assert ds[0]["images"] == [str(tmp_path / "img" / "2.png")]


def test_relative_paths_are_read_from_the_data_files_folder(tmp_path, monkeypatch):
    png(tmp_path / "data" / "a.png")
    path = jsonl(tmp_path / "data" / "t.jsonl", [{"messages": [{"role": "user", "content": "<image>Hi"},
                                                               {"role": "assistant", "content": "Hello"}],
                                                  "images": ["a.png"]}])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load(path)[0]["images"] == [str(tmp_path / "data" / "a.png")]


def test_datasets_parquet_with_an_image_feature(tmp_path, monkeypatch):
    """A parquet written by `datasets` with an Image feature: bytes become data URLs, a path without bytes is
    read from the file's folder; a local `hf:` dataset folder reads the same."""
    import datasets

    red = Image.new("RGB", (5, 4), (255, 0, 0))
    png(tmp_path / "hf" / "green.png", color=(0, 255, 0))
    messages = [{"role": "user", "content": [{"type": "image", "text": None},
                                             {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]
    features = datasets.Features({"messages": [{"role": datasets.Value("string"),
                                                "content": [{"type": datasets.Value("string"),
                                                             "text": datasets.Value("string")}]}],
                                  "images": datasets.Sequence(datasets.Image())})
    # datasets reads the file of a path without bytes from the working folder
    monkeypatch.chdir(tmp_path / "hf")
    ds = datasets.Dataset.from_dict({"messages": [messages, messages],
                                     "images": [[red], [{"bytes": None, "path": "green.png"}]]},
                                    features=features)
    ds.to_parquet(str(tmp_path / "hf" / "train.parquet"))
    monkeypatch.chdir(tmp_path)
    for source in (tmp_path / "hf" / "train.parquet", f"hf:{tmp_path / 'hf'}"):
        got = load(source)
        assert got[0]["messages"] == [{"role": "user", "content": [IMG, text("Colour?")]}, answer("Red.")]
        assert got[0]["images"][0].startswith("data:image/png;base64,")
        assert load_image(got[0]["images"][0]).getpixel((0, 0)) == (255, 0, 0)
        assert got[1]["images"] == [str(tmp_path / "hf" / "green.png")]


def test_preference_rows_with_images(tmp_path):
    """TRL's DPO vision rows (prompt parts and `images`) and string rows with an `image` column load as
    prompt, chosen, rejected messages; an image in an answer is refused (images go in the prompt both answers
    share)."""
    png(tmp_path / "a.png")
    rows = [{"prompt": [{"role": "user", "content": [IMG, text("Describe it.")]}],
             "chosen": [{"role": "assistant", "content": [text("A red square.")]}],
             "rejected": [{"role": "assistant", "content": [text("A dog.")]}], "images": ["a.png"]},
            {"prompt": "What colour?", "chosen": "Red.", "rejected": "Blue.", "images": ["a.png"]}]
    ds, fmt = load_training_dataset(jsonl(tmp_path / "p.jsonl", rows))
    assert fmt == "preference" and ds.column_names == ["prompt", "chosen", "rejected", "images"]
    assert ds[0] == {"prompt": [{"role": "user", "content": [IMG, text("Describe it.")]}],
                     "chosen": [answer("A red square.")], "rejected": [answer("A dog.")],
                     "images": [str(tmp_path / "a.png")]}
    assert ds[1]["prompt"] == [{"role": "user", "content": [IMG, text("What colour?")]}]
    assert ds[1]["chosen"] == [answer("Red.")] and ds[1]["images"] == [str(tmp_path / "a.png")]
    rows[0]["chosen"][0]["content"].append(IMG)
    rows[0]["images"].append("a.png")
    with pytest.raises(DataError,
                       match=r"p2\.jsonl:1: chosen\[0\]: an image in 'chosen': images go in the prompt"):
        load_training_dataset(jsonl(tmp_path / "p2.jsonl", rows))


def test_prompt_only_rows_with_images_keep_their_other_columns(tmp_path):
    png(tmp_path / "a.png")
    rows = [{"prompt": "<image>How many sides?", "image": "a.png", "answer": "4"},
            {"prompt": "How many legs has a cat?", "answer": "4"}]
    ds, fmt = load_training_dataset(jsonl(tmp_path / "g.jsonl", rows), accepts=("prompt_only",))
    assert fmt == "prompt_only" and sorted(ds.column_names) == ["answer", "images", "prompt"]
    assert ds[0]["prompt"] == [{"role": "user", "content": [IMG, text("How many sides?")]}]
    assert ds["images"] == [[str(tmp_path / "a.png")], []] and ds["answer"] == ["4", "4"]


def test_text_only_data_is_unchanged(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
             "images": []}]
    ds = load(jsonl(tmp_path / "t.jsonl", rows))
    assert ds.column_names == ["messages"] and not has_images(ds) and not has_images(rows)
    assert ds[0]["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    # text parts without any image in the data read as strings, the one form of text-only data
    rows[0]["messages"][0]["content"] = [text("Hi "), text("there")]
    assert load(jsonl(tmp_path / "parts.jsonl", rows))[0]["messages"][0] == {"role": "user",
                                                                             "content": "Hi there"}


def test_messages_helpers_read_parts():
    content = [IMG, text("What is "), {"type": "image_url", "image_url": {"url": "x.png"}}, text("?")]
    assert text_of(content) == "What is ?" and image_count(content) == 2 and image_count("text") == 0
    assert text_of([{"type": "image", "text": None}, text("a")]) == "a"  # Arrow's null text of an image part


def test_load_image_and_its_errors(tmp_path):
    a = png(tmp_path / "a.png", size=(3, 2))
    assert load_image(str(a)).size == (3, 2) and load_image(data_url(a)).mode == "RGB"
    with pytest.raises(FinetuneError, match=f"image not found: {tmp_path / 'no.png'}"):
        load_image(str(tmp_path / "no.png"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(FinetuneError, match=f"cannot load the image {tmp_path / 'bad.png'}"):
        load_image(str(tmp_path / "bad.png"))


# ---------------------------------------------------------------- refused, by file and line


def _vqa(image="a.png", content=None):
    return {"messages": [{"role": "user", "content": content or [IMG, text("Colour?")]},
                         {"role": "assistant", "content": "Red."}], "images": [image] if image else []}


def test_missing_undecodable_and_miscounted_images_are_refused_with_file_and_line(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(png(tmp_path / "whole.png", size=(64, 64)).read_bytes()[:60])
    rows = [_vqa(), _vqa("missing.png"), _vqa(content=[IMG, IMG, text("Two?")]), _vqa(None),
            {**_vqa(), "images": ["a.png", "a.png"]}, _vqa("broken.png")]
    path = jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_training_dataset(path)
    message = str(info.value)
    assert (f"{path}:2: images[0]: image file not found: {tmp_path / 'missing.png'} (written 'missing.png': "
            "relative paths are read from the data file's folder); fix the path, or put the image "
            "there") in message
    assert f"{path}:3: 2 image placeholders" in message and ("but 1 image in 'images': add the "
                                                             "missing") in message
    assert f"{path}:4: 1 image placeholder (" in message and "but 0 images in 'images'" in message
    assert f"{path}:5: 1 image placeholder (" in message and ("but 2 images in 'images': put a "
                                                              "placeholder") in message
    report = check_data(path)  # the data check reads them the same way, and opens every image
    assert {i.line for i in report.errors} == {2, 3, 4, 5, 6}
    (broken,) = [i for i in report.errors if i.line == 6]
    assert str(broken).startswith(f"{path}:6: images[0]: cannot decode the image {tmp_path / 'broken.png'}")
    assert str(broken).endswith("re-save it as PNG or JPEG, or drop the row")


def test_images_for_a_text_only_model_are_refused(tmp_path):
    """`tiny` (and every built-in text model) reads text only; with no model named, nothing is guessed."""
    png(tmp_path / "a.png")
    path = jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                      {"role": "assistant", "content": "Hello"}]}, _vqa()])
    assert check_data(path).ok
    report = check_data(path, model="tiny")
    assert [str(i) for i in report.errors] == [
        f"{path}:2: 1 row has images (the first on this line), but tiny reads text only: name a "
        "vision-language model with --model (one whose processor takes images: SmolVLM, Qwen2-VL, LLaVA, "
        "Gemma 3 4B and up, ...), or leave the images out"]
    assert [model_takes_images(name) for name in ("tiny", "smollm2", "gemma3", "tiny-qwen3",
                                                  "tiny-gemma3")] == [False] * 5


def test_model_takes_images_reads_the_config(tmp_path):
    from transformers import LlamaConfig, LlavaConfig

    LlavaConfig().save_pretrained(tmp_path / "llava")
    LlamaConfig().save_pretrained(tmp_path / "llama")
    assert model_takes_images(str(tmp_path / "llava")) is True
    assert model_takes_images(str(tmp_path / "llama")) is False
    assert model_takes_images(str(tmp_path / "nothing-here")) is None


def test_preflight_refuses_images_for_the_tiny_model_before_any_run(tmp_path):
    from mlflow_finetune_plugin.backend import resolve_entry_point

    png(tmp_path / "data" / "a.png")
    rows = [_vqa() for _ in range(3)] + [_vqa(content=[IMG, text(f"Colour {i}?")]) for i in range(3)]
    jsonl(tmp_path / "data" / "train.jsonl", rows)
    (tmp_path / "finetune.yaml").write_text("data:\n  train: data/train.jsonl\n  eval_split: 0\neval:\n"
                                            "  enabled: false\n")
    with pytest.raises(FinetuneError) as info:
        resolve_entry_point(str(tmp_path), "lora", {"model": "tiny"})
    assert "nothing was started" in str(info.value)
    assert (
        "data/train.jsonl:1: 6 rows have images (the first on this line), but tiny reads text only: name a "
        "vision-language model with model.name") in str(info.value)


# ---------------------------------------------------------------- what the check reports


def test_report_counts_sizes_and_warnings(tmp_path):
    png(tmp_path / "small.png", size=(4, 3))
    png(tmp_path / "wide.png", size=(4100, 2))
    rows = [_vqa("small.png"), _vqa("wide.png"), _vqa("https://example.com/x.png"),
            {"messages": [{"role": "user", "content": "Text only"},
                          {"role": "assistant", "content": "Yes."}]}]
    path = jsonl(tmp_path / "t.jsonl", rows)
    result = CliRunner().invoke(main, ["data", "check", path, "--json"])
    assert result.exit_code == 0, result.output
    (report,) = json.loads(result.output)
    assert report["images"] == {"rows": 3, "total": 3, "urls": 1, "min_width": 4, "max_width": 4100,
                                "min_height": 2, "max_height": 3}
    warnings = {w["line"]: w["message"] for w in report["warnings"] if w["line"]}
    assert warnings[2] == ("images[0]: 4100×2 px, more than 4096 on a side: resized to the processor's "
                           "limits at training")
    assert warnings[3] == (
        "images[0]: https://example.com/x.png is not checked offline (the collator fetches it at "
        "training)")
    text_report = CliRunner().invoke(main, ["data", "check", path]).output
    assert (
        "images          3 in 3 rows, widths 4-4100 px, heights 2-3 px, 1 http(s) URLs not checked "
        "offline" in text_report)
    assert f"{path}:2: images[0]: 4100×2 px, more than 4096 on a side" in text_report
    # the same on several rows is one line with the count
    many = jsonl(tmp_path / "many.jsonl", [_vqa(f"https://example.com/{i}.png") for i in range(3)])
    assert (
        f"{many}: images given as http(s) URLs are not checked offline: the collator fetches them at "
        "training; check they can be reached from there, or download them and give their paths (3 rows: "
        "lines 1, 2, 3)"
    ) in CliRunner().invoke(main, ["data", "check", many]).output
    assert "(text only)" in text_report  # the token counts say what they leave out
    assert (
        "image tokens    3 rows have images: their image tokens come on top of the text tokens counted here, "
        "and are counted when the processor is known") in text_report


def test_the_same_question_on_different_images_is_no_duplicate(tmp_path):
    """Two rows that differ only in their image are different examples: neither near-duplicates nor
    contradictions; the same image twice is."""
    png(tmp_path / "a.png")
    png(tmp_path / "b.png", color=(0, 0, 255))
    blue = _vqa("b.png")
    blue["messages"][1]["content"] = "Blue."
    report = check_data(jsonl(tmp_path / "t.jsonl", [_vqa("a.png"), blue]))
    assert (report.near_duplicates, report.contradictions, report.duplicates) == (0, 0, 0)
    report = check_data(jsonl(tmp_path / "t2.jsonl", [_vqa("a.png"), {**_vqa("a.png"), "note": 1}]))
    assert report.near_duplicates == 1


def test_parquet_written_by_pyarrow_with_image_bytes(tmp_path):
    """Image bytes in a plain parquet struct (as datasets stores an Image feature) and a mixed dataset: the
    rows without images have `[]` and text parts."""
    raw = png(tmp_path / "x.png").read_bytes()
    rows = [{"messages": [{"role": "user", "content": "<image>What?"},
                          {"role": "assistant", "content": "Red."}],
             "images": [{"bytes": raw, "path": None}]}, {"messages": [{"role": "user", "content": "Hi"},
                                                                      {"role": "assistant",
                                                                       "content": "Hello"}], "images": []}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    ds = load(tmp_path / "t.parquet")
    assert ds["images"] == [["data:image/png;base64," + base64.b64encode(raw).decode()], []]
    assert ds[1]["messages"] == [{"role": "user", "content": [text("Hi")]}, answer("Hello")]


def test_a_mixture_of_a_task_with_images_and_a_text_task(tmp_path):
    """The text-only task takes the image form (text parts, `images` []) so that the tasks interleave."""
    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.data.splits import load_splits
    from tests.helpers import chat_rows

    png(tmp_path / "data" / "a.png")
    jsonl(tmp_path / "data" / "pictures.jsonl", [_vqa(content=[IMG, text(f"Colour {i}?")]) for i in range(8)])
    jsonl(tmp_path / "data" / "words.jsonl", chat_rows(8))
    (tmp_path / "finetune.yaml").write_text("method: multitask\ndata:\n  max_length: 64\n  tasks:\n"
                                            "    pictures: {train: data/pictures.jsonl}\n"
                                            "    words: {train: data/words.jsonl}\n")
    splits = load_splits(load_recipe(tmp_path, overrides={"model": "tiny"}))
    assert "images" not in splits.tasks["words"].column_names  # each task as read, for its record in the run
    rows = splits.train.to_list()
    assert {len(r["images"]) for r in rows} == {0, 1} and all(isinstance(m["content"], list) for r in rows
                                                               for m in r["messages"])
    words = next(r for r in rows if not r["images"])
    assert words["messages"][0]["content"] == [text(words["messages"][0]["content"][0]["text"])]



def test_preflight_passes_images_for_a_vision_language_model(tmp_path, capsys):
    """A model whose config is an image-text-to-text one (a LLaVA config alone: no tokenizer at hand, so
    lengths are left to training): the images pass, the rows read as training reads them, and a note says what
    token lengths leave out."""
    from transformers import LlavaConfig

    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.data.check import check_data as check
    from mlflow_finetune_plugin.data.preflight import check_recipe_data

    LlavaConfig().save_pretrained(tmp_path / "llava")
    png(tmp_path / "data" / "a.png")
    jsonl(tmp_path / "data" / "train.jsonl", [_vqa(content=[IMG, text(f"Colour {i}?")]) for i in range(6)])
    (tmp_path / "finetune.yaml").write_text("data:\n  train: data/train.jsonl\n  eval_split: 0\neval:\n"
                                            "  enabled: false\n")
    check_recipe_data(load_recipe(tmp_path, overrides={"model": str(tmp_path / "llava")}), check)
    assert (
        "Note: rows with images (data.train 6): token lengths count their text only (the model's processor "
        "was not at hand); their image tokens are counted before the first step.") in capsys.readouterr().err
