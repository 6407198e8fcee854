"""Images in the A/B playground, on a tiny LLaVA tuned by recipes/vision-colors (120 steps) against its base:
driven
by gradio_client (`compare` with an uploaded file and with a data URL, votes, `votes export` to preference and
KTO rows that `load_training_dataset` reads back with their images, after the playground's copies are gone)
and by headless Chromium (an image uploaded through the prompt box, shown and answered in both panes, a vote).
A text model given an image says so, in the status line, and the page goes on working."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil

import mlflow
import pytest
from click.testing import CliRunner
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from mlflow import MlflowClient

from mlflow_finetune_plugin.arena.votes import VOTE_FILE
from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.data.read import load_training_dataset
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.serving import ModelChoice
from mlflow_finetune_plugin.serving.base import Engine
from mlflow_finetune_plugin.serving.playground import Playground, build_app, launch
from mlflow_finetune_plugin.serving.playground.images import image_folder
from mlflow_finetune_plugin.serving.transformers_engine import TransformersEngine
from tests.helpers import (
    REPO,
    forget_active_experiment,
    free_port,
    register_version,
    train_in_process,
    use_store,
)
from tests.test_playground import _chromium

pytestmark = pytest.mark.integration

VISION = REPO / "recipes" / "vision-colors"
IMAGES = VISION / "data" / "images"
RED, BLUE = IMAGES / "eval-000-red-square.png", IMAGES / "eval-002-blue-circle.png"
QUESTION = "What colour is the shape?"  # the recipe's one question: only the image tells the colours apart
TUNED, BASE, TEXT = "vision-colors/1", "vision-colors/1:base", "bot/1"
SHORT = {"max_new_tokens": 8}
EXPERIMENT = "image-votes"
# `votes export --format` -> the data format
FORMATS = {"preference": "preference", "kto": "unpaired_preference"}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """vision-colors v1 @challenger (a LoRA on tiny-llava, 120 steps: it names the colours), and bot v1, a
    text model."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("playground-images")
    uri = use_store(mp, root)
    code, run = train_in_process(VISION, root, {"train.max_steps": 120, "train.save_steps": 1000,
                                                "eval.enabled": False}, "vision-colors")
    assert code == 0 and run.info.status == "FINISHED"
    register_version("bot", seed=0, alias="challenger")
    yield uri
    mp.undo()
    forget_active_experiment()
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def app(store):
    """The tuned LLaVA (A) against the text model (B); the pickers list both models' versions and bases."""
    engine = TransformersEngine(device="cpu", concurrency=2)
    pg = Playground(engine, ModelChoice("vision-colors", "1"), ModelChoice("bot", "1"), experiment=EXPERIMENT)
    demo = build_app(pg)
    _, url, _ = launch(demo, host="127.0.0.1", port=free_port(), block=False, quiet=True)
    yield url, Client(url, verbose=False), pg
    demo.close()
    engine.close()


def test_compare_with_images_vote_and_export_rows_that_load_with_their_images(app, tmp_path):
    _, client, _ = app
    red = client.predict(QUESTION, TUNED, BASE, **SHORT, images=[handle_file(str(RED))], api_name="/compare")
    blue = client.predict(QUESTION, TUNED, BASE, **SHORT, images=[_data_url(BLUE)], api_name="/compare")
    # The tuned side reads the colour from the image; the base side (random weights) answers something else.
    assert (red["a"]["answer"], blue["a"]["answer"]) == ("red", "blue")
    assert all(r["b"]["answer"] and not r["b"]["error"] and r["b"]["answer"] != r["a"]["answer"]
               for r in (red, blue))
    # Uploaded once, kept by content: the file and the data URL of the same bytes are one copy each.
    stored = {p.name for p in image_folder().iterdir()}
    assert {f"{_sha(RED)}.png", f"{_sha(BLUE)}.png"} <= stored

    for r in (red, blue):
        client.predict(r["id"], "a", api_name="/vote")
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(EXPERIMENT).experiment_id],
                                      order_by=["attributes.start_time ASC"])
    assert [run.data.tags["finetune.vote.prompt"] for run in runs] == [QUESTION, QUESTION]
    # The vote keeps its image in its own run: vote.json names it by a runs:/ URI, which MLflow resolves.
    vote = mlflow.artifacts.load_dict(f"{runs[0].info.artifact_uri}/{VOTE_FILE}")
    uri = f"runs:/{runs[0].info.run_id}/images/{_sha(RED)}.png"
    question = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": QUESTION}]
    assert vote["context_a"] == vote["context_b"] == [{"role": "user", "content": question}]
    logged = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "fetched"))
    assert open(logged, "rb").read() == RED.read_bytes()

    shutil.rmtree(image_folder())  # the playground's copies are gone: the export reads the votes' own images
    out = tmp_path / "export"
    runner = CliRunner()
    written = {"preference": "Wrote 2 preference pairs", "kto": "Wrote 4 thumbs-up/down rows"}
    for fmt, data_format in FORMATS.items():
        result = runner.invoke(main, ["votes", "export", "vision-colors", "--experiment", EXPERIMENT,
                                      "--format", fmt, "-o", str(out / f"{fmt}.jsonl")])
        assert result.exit_code == 0 and written[fmt] in result.output, result.output
        check = runner.invoke(main, ["data", "check", str(out / f"{fmt}.jsonl"), "--format", data_format])
        assert check.exit_code == 0, check.output
    # The rows name their images by paths relative to the file, downloaded beside it.
    first = json.loads((out / "preference.jsonl").read_text().splitlines()[0])
    assert first == {"prompt": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"images/{_sha(RED)}.png"}},
        {"type": "text", "text": QUESTION}]}],
        "chosen": [{"role": "assistant", "content": "red"}],
        "rejected": [{"role": "assistant", "content": red["b"]["answer"]}]}
    assert (out / "images" / f"{_sha(RED)}.png").read_bytes() == RED.read_bytes()

    # What the dpo and kto entry points train on: placeholders in the prompt, the images in their own column.
    for (fmt, data_format), n in zip(FORMATS.items(), (2, 4)):
        dataset, got = load_training_dataset(out / f"{fmt}.jsonl", data_format)
        assert got == data_format and dataset.num_rows == n
        rows = dataset.to_list()
        assert [row["images"] for row in rows[:1]] == [[str(out / "images" / f"{_sha(RED)}.png")]]
        assert {row["images"][0] for row in rows} == {str(out / "images" / f"{_sha(c)}.png")
                                                      for c in (RED, BLUE)}
        parts = rows[0]["prompt"][0]["content"]
        assert [(p["type"], p.get("text")) for p in parts] == [("image", None), ("text", QUESTION)]


def test_a_text_model_given_an_image_says_so(app, tmp_path):
    _, client, pg = app
    for sides, refused in (((TUNED, TEXT), "bot v1 @challenger does not take"),
                           ((TEXT, "bot/1:base"), "bot v1 @challenger and base: tiny-llama do not take "
                                                  "images")):
        with pytest.raises(AppError, match=refused):
            client.predict(QUESTION, *sides, **SHORT, images=[handle_file(str(RED))], api_name="/compare")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    for images, message in (([handle_file(str(not_an_image))],
                             "notes.png is not an image the playground can read"),
                            (["/etc/hostname"], "neither an uploaded file nor an image data URL"),
                            (["data:image/png;base64,@@@"], "base64 text is not valid"),
                            ([_data_url(RED)] * 5, "at most 4 per message")):
        with pytest.raises(AppError, match=message):
            client.predict(QUESTION, TUNED, BASE, **SHORT, images=images, api_name="/compare")
    # Text still goes to both, text model included.
    r = client.predict(QUESTION, TUNED, TEXT, **SHORT, api_name="/compare")
    assert r["a"]["answer"] and r["b"]["answer"] and r["id"]


def test_an_engine_that_sends_text_only_refuses_images(store):
    class TextOnly(Engine):  # what the vllm and openai engines are: they send the models text only
        name = "openai"

        def stream(self, choice, messages, settings):
            yield "text"

    pg = Playground(TextOnly(), ModelChoice("vision-colors", "1"), ModelChoice("vision-colors", "1",
                                                                               base=True))
    with pytest.raises(FinetuneError,
                       match="the openai engine sends the models text only: start the playground "
                             "with --engine transformers"):
        pg.compare(QUESTION, images=[str(RED)])
    assert pg.compare(QUESTION)["a"]["answer"] == "text"


@pytest.mark.skipif(_chromium() is None,
                    reason="needs Debian's chromium (apt-get install chromium; .ci/run does)")
def test_an_image_uploaded_in_the_browser_goes_to_both_panes(app, tmp_path):
    from playwright.sync_api import sync_playwright

    url, _, _ = app
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"], headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        page.wait_for_selector("#chat-b")
        upload = page.locator("#prompt input[type=file]")

        def attach(path):
            upload.set_input_files(str(path))
            page.wait_for_function("document.querySelectorAll('#prompt img').length === 1", timeout=30_000)

        # B is the text model: the image is refused in the status line, and stays in the box to remove or
        # resend.
        attach(RED)
        page.locator("#prompt textarea").fill(QUESTION)
        page.locator("#send").click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('Not sent')",
                               timeout=60_000)
        assert "bot v1 @challenger does not take images" in page.locator("#status").inner_text()
        assert page.locator("#chat-a [data-testid=bot]").count() == 0
        assert page.locator("#prompt img").count() == 1

        # B becomes the LLaVA's base: both panes show the image and answer it; the tuned side names its
        # colour.
        page.locator("#pick-b input").click()
        page.get_by_role("option", name="base: tiny-llava").click()
        page.wait_for_function("document.querySelector('#chat-b').innerText.includes('B: base: tiny-llava')",
                               timeout=30_000)
        page.locator("#send").click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('Vote below')",
                               timeout=120_000)
        for side in "ab":
            assert page.locator(f"#chat-{side} [data-testid=user] img").count() == 1
            assert page.locator(f"#chat-{side} [data-testid=user]").last.inner_text().strip().endswith(
                QUESTION)
        answers = [page.locator(f"#chat-{s} [data-testid=bot]").last.inner_text().strip() for s in "ab"]
        assert answers[0] == "red" and answers[1] and answers[1] != "red"
        assert page.locator("#prompt img").count() == 0  # sent: the box is empty again
        # The image loads from the page's own server (not a broken link).
        loaded = page.evaluate("[...document.querySelectorAll('#chat-a [data-testid=user] img')]"
                               ".every(img => img.complete && img.naturalWidth > 0)")
        assert loaded
        page.locator("#vote-a").click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('Vote logged')",
                               timeout=30_000)
        # A follow-up without an image: the first image stays in the conversation both sides answer.
        page.locator("#prompt textarea").fill("And now?")
        page.locator("#send").click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('Vote below')",
                               timeout=120_000)
        assert page.locator("#chat-a [data-testid=user] img").count() == 1
        shot = tmp_path / "images.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
