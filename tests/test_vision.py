"""Vision fine-tuning (issue 59): a vision-language model trained on images, evaluated, logged and answering
images.

The task is recipes/vision-colors: every question is the same sentence, and the answer is the colour of the
shape in the image, so a model blind to the image scores at most 1/4. The models are the built-in tiny random
VLMs of three families (LLaVA, SmolVLM's Idefics3, Gemma 3), built locally from their config classes with
their processors.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_finetune_plugin.errors import FinetuneError
from tests.helpers import REPO, subprocess_env, train_in_process

RECIPE = REPO / "recipes" / "vision-colors"
FAMILIES = ["tiny-llava", "tiny-smolvlm", "tiny-gemma3-vision"]
QUESTION = "What colour is the shape?"
RED, BLUE = (220, 30, 30), (30, 60, 220)


def _data_url(colour, size=64) -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(image).ellipse((10, 14, 50, 54), fill=colour)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}]


def _project(tmp_path: Path) -> Path:
    """The recipe copied (its data and images too), so a test writes nothing into the checkout."""
    return Path(shutil.copytree(RECIPE, tmp_path / "vision-colors"))


def _metrics(run) -> dict:
    return MlflowClient().get_run(run.info.run_id).data.metrics


def test_mlflow_run_trains_a_vlm_on_images_and_the_version_answers_images(tmp_path, tracking_uri):
    """The recipe as a user runs it: `mlflow run -e lora --backend finetune` on the tiny LLaVA. The tuned
    model reads the colour from held-out images; zero-shot and few-shot prompting cannot; the version answers
    images given as a data URL through pyfunc, and carries what it needs (pillow, a signature taking content
    parts)."""
    project = _project(tmp_path)
    cmd = [sys.executable, "-m", "mlflow", "run", str(project), "-e", "lora", "--backend", "finetune",
           "--experiment-name", "vision"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(tracking_uri), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("vision").experiment_id])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["eval/tuned/exact_match"] >= 0.9, metrics
    assert metrics["eval/base/exact_match"] <= 0.25 and metrics["eval/fewshot/exact_match"] <= 0.25, metrics
    assert run.data.tags["finetune.loss_on"] == "assistant"
    # The per-example table names each prompt's image; MLflow's evaluation view shows it (kept as an
    # attachment).
    table = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="eval/examples.json")
        ).read_text()
    )
    images = [row[table["columns"].index("images")] for row in table["data"]]
    assert len(images) == 24 and all(Path(i).name.startswith("eval-") for i in images)
    trace = mlflow.search_traces(locations=[run.info.experiment_id], return_type="list", max_results=1)[0]
    image_part = json.loads(trace.data.request)["messages"][0]["content"][0]
    assert image_part["image_url"]["url"].startswith("mlflow-attachment://")

    version = client.get_model_version_by_alias("vision-colors", "challenger")
    model = mlflow.pyfunc.load_model("models:/vision-colors@challenger")
    answers = model.predict([{"messages": _ask(_data_url(RED))}, {"messages": _ask(_data_url(BLUE))}],
                            params={"max_new_tokens": 6})
    assert answers == ["red", "blue"]
    local = Path(mlflow.artifacts.download_artifacts(f"models:/vision-colors/{version.version}"))
    assert any(line.startswith("pillow") for line in (local / "requirements.txt").read_text().splitlines())
    assert (local / "artifacts" / "tokenizer" / "processor_config.json").is_file()


@pytest.mark.parametrize("family", FAMILIES[1:])
def test_each_family_learns_to_read_the_image(family, tmp_path, tracking_uri):
    """LoRA on the language model only (the tower and projector frozen) learns the image task in each family
    (LLaVA's is the `mlflow run` above)."""
    code, run = train_in_process(_project(tmp_path), tmp_path, {"model.name": family}, f"vision-{family}")
    assert code == 0 and run.info.status == "FINISHED"
    metrics = _metrics(run)
    assert metrics["eval/tuned/exact_match"] >= 0.9, metrics
    assert metrics["eval/base/exact_match"] <= 0.25, metrics


def _collator(family: str, max_length=None):
    from mlflow_finetune_plugin.data.image_rows import VisionCollator
    from mlflow_finetune_plugin.models.base import load_tokenizer
    from mlflow_finetune_plugin.models.vision import processor_of

    tok = load_tokenizer(family)
    return VisionCollator(processor_of(tok), tok, max_length=max_length), tok


def _rows(n=2):
    from mlflow_finetune_plugin.data.read import load_training_dataset

    ds, _ = load_training_dataset(str(RECIPE / "data" / "eval.jsonl"))
    return [ds[i] for i in range(n)]


@pytest.mark.parametrize("family", [*FAMILIES, "tiny-qwen2-vl"])
def test_only_the_answer_and_its_end_of_turn_train_never_the_image_tokens(family):
    collator, tok = _collator(family)
    rows = _rows()
    batch = collator(rows)
    assert "pixel_values" in batch
    image_id = collator.processor.tokenizer.convert_tokens_to_ids(collator.processor.image_token) \
        if hasattr(collator.processor, "image_token") else None
    for b, row in enumerate(rows):
        labels = batch["labels"][b]
        trained = batch["input_ids"][b][labels != -100].tolist()
        answer = row["messages"][-1]["content"][0]["text"]
        assert tok.decode(trained).strip().startswith(answer), tok.decode(trained)
        assert len(trained) <= len(tok(answer, add_special_tokens=False)["input_ids"]) + 3
        if image_id is not None:
            assert image_id in batch["input_ids"][b].tolist() and image_id not in trained


def test_a_row_too_long_with_its_image_tokens_is_refused_before_training_with_its_row():
    """The image tokens count: the text alone fits, with them the row does not; never cut through them."""
    from datasets import Dataset

    collator, tok = _collator("tiny-smolvlm", max_length=30)
    with pytest.raises(FinetuneError,
                       match=r"data.train row 1: a row of \d+ tokens with its images is longer than "
                             r"data.max_length 30"):
        collator.check(Dataset.from_list(_rows(2)), "data.train")


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_full_and_qlora_with_images_log_a_model_that_answers_images(method, tmp_path, tracking_uri):
    """-e full trains every weight; -e qlora loads the language model in 4 bits, the tower and projector in
    full precision (models/vision.unquantized_modules)."""
    code, run = train_in_process(_project(tmp_path), tmp_path, {"model.name": "tiny-llava", "epochs": 6},
                                 f"vision-{method}", method=method)
    assert code == 0 and run.info.status == "FINISHED"
    assert _metrics(run)["eval/tuned/exact_match"] >= 0.9
    model = mlflow.pyfunc.load_model("models:/vision-colors@challenger")
    assert model.predict([{"messages": _ask(_data_url(RED))}], params={"max_new_tokens": 6}) == ["red"]


def test_a_vlm_tuned_on_text_only_keeps_its_vision_tower_and_still_takes_images(tmp_path, tracking_uri):
    from tests.matrix_helpers import write_chat_project

    project = write_chat_project(tmp_path / "text", "vlm-text")
    code, run = train_in_process(project, tmp_path, {"model.name": "tiny-llava", "train.max_steps": 3},
                                 "vlm-text")
    assert code == 0 and run.info.status == "FINISHED"
    model = mlflow.pyfunc.load_model("models:/vlm-text@challenger")
    (answer,) = model.predict([{"messages": _ask(_data_url(RED))}], params={"max_new_tokens": 4})
    assert isinstance(answer, str)
    assert model.model_config["takes_images"] is True


def test_images_for_a_text_only_model_are_refused_before_any_run(tmp_path, tracking_uri):
    project = _project(tmp_path)
    cmd = [sys.executable, "-m", "mlflow", "run", str(project), "-e", "lora", "--backend", "finetune",
           "-P", "model=tiny", "--experiment-name", "vision-text-model"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(tracking_uri), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0
    assert ("but tiny reads text only: name a vision-language model with "
            "model.name") in proc.stderr, proc.stderr[-3000:]
    experiment = MlflowClient().get_experiment_by_name("vision-text-model")
    assert experiment is None or MlflowClient().search_runs([experiment.experiment_id]) == []


@pytest.fixture
def tuned_llava(tmp_path, tracking_uri):
    """vision-colors on the tiny LLaVA, registered (`vision-colors@challenger`)."""
    code, run = train_in_process(_project(tmp_path), tmp_path, {"model.name": "tiny-llava", "epochs": 12},
                                 "vision-serve")
    assert code == 0 and _metrics(run)["eval/tuned/exact_match"] >= 0.9
    return tracking_uri


@pytest.mark.integration
def test_serve_answers_image_requests_of_the_openai_client_streamed_or_not(tuned_llava):
    import openai

    from tests.helpers import cli_process, free_port, stop, wait_for_http

    port = free_port()
    proc = cli_process("serve", "vision-colors@challenger", "--engine", "transformers", "--port", str(port))
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        (name,) = [m.id for m in client.models.list()]
        for colour, expected in ((RED, "red"), (BLUE, "blue")):
            answer = client.chat.completions.create(model=name, messages=_ask(_data_url(colour)),
                                                    max_tokens=6, temperature=0.0)
            assert answer.choices[0].message.content.strip() == expected
            stream = client.chat.completions.create(model=name, messages=_ask(_data_url(colour)),
                                                    max_tokens=6, temperature=0.0, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip() == expected
    finally:
        stop(proc)


@pytest.mark.integration
def test_a_vlm_version_answers_images_without_the_plugin_and_through_mlflow_models_serve(tuned_llava,
                                                                                         tmp_path):
    """The version deploys the MLflow way (tests/test_deploy.py): in an environment with the model's
    requirements and no plugin, pyfunc and `mlflow models serve`'s /invocations answer a message with an image
    part."""
    import os
    import signal
    import urllib.request

    from tests.helpers import free_port, wait_for_http
    from tests.test_deploy import DEPLOY_STACK, _plain_env, make_plain_env

    plain_bin = make_plain_env(tmp_path / "venv", (*DEPLOY_STACK, "pillow"))
    env = _plain_env(plain_bin, tuned_llava, tmp_path / "fresh-cache")
    script = ("import json, sys, mlflow, importlib.util\n"
              "assert not importlib.util.find_spec('mlflow_finetune_plugin') or 'code' in "
              "importlib.util.find_spec('mlflow_finetune_plugin').origin\n"
              "m = mlflow.pyfunc.load_model('models:/vision-colors@challenger')\n"
              "print(json.dumps(m.predict([{'messages': json.loads(sys.argv[1])}], params={'max_new_tokens': "
              "6})))")
    proc = subprocess.run([str(plain_bin / "python"), "-c", script, json.dumps(_ask(_data_url(BLUE)))],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["blue"]

    port = free_port()
    server = subprocess.Popen([str(plain_bin / "mlflow"), "models", "serve", "-m",
                               "models:/vision-colors@challenger", "--env-manager", "local", "--port",
                               str(port)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, timeout=300)
        body = {"dataframe_records": [{"messages": _ask(_data_url(RED))}], "params": {"max_new_tokens": 6}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            assert json.loads(answer.read())["predictions"] == ["red"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_a_vlm_version_exports_merged_with_its_processor(tuned_llava, tmp_path):
    """`mlflow-finetune export`: the adapter merged into the base, with the processor, loads in plain
    transformers and answers the image as the version does."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mlflow_finetune_plugin.models.image_inputs import read_image
    from mlflow_finetune_plugin.registry.export import export_model

    out = tmp_path / "export"
    export_model("models:/vision-colors@challenger", out, log=False)
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": QUESTION}]}],
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=[[read_image(_data_url(RED))]], return_tensors="pt")
    with torch.no_grad():
        out_ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    answer = processor.tokenizer.decode(out_ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() == "red"
