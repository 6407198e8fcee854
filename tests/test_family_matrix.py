"""Every chat family through what a user does with it (issue 44): the tiny random models of Llama 3.2,
Qwen2.5, Qwen3, Gemma 3, Mistral v0.3 and Phi-3.5 (tests/test_families.py checks that they are the real
families), and the built-in tiny model as the plain ChatML row.

Per family: the trained tokens of a row are exactly each assistant reply and its end-of-turn token; `mlflow
run -e lora --backend finetune` (pre-flight, training, evaluation, registration) finishes with the tags that
say so; `-e dpo` trains; the registered version reloads through `mlflow.pyfunc`; the transformers engine and
the playground answer; `mlflow-finetune export` writes a merged folder that answers as the pyfunc does; and
wherever an answer is generated, the family's end-of-turn token ends it (forced with `Script`, so it does not
depend on what random weights emit). No Future/DeprecationWarning comes from our own modules on the way. vLLM
serves a family in tests/test_system_prompts.py, where a trained model's answers can be checked word for word.

One `mlflow run` per family, started together (two at a time) the first time a test needs them, against one
store. The tiny model's own runs, versions, serving and export are tested elsewhere (test_integration,
test_serving, test_export): here it is a row only where that costs little.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_finetune_plugin import tags
from tests.helpers import REPO, forget_active_experiment, subprocess_env
from tests.matrix_helpers import (
    CONVERSATION,
    EARLIER_END_OF_TURN,
    EARLIER_LEAD,
    END_OF_TURN,
    FAMILIES,
    FOLDS_SYSTEM,
    LAST_LEAD,
    ROWS,
    Script,
    end_to_end,
    model_name,
    own_warnings,
    registered_name,
    trained_pieces,
    write_chat_project,
)

QUESTION = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is 3 plus 3?"}]
# Two optimizer steps, 2 held-out rows, short answers: the run's steps, not the model's quality, are what is
# tested.
RUN_OVERRIDES = {"train.max_steps": 2, "train.batch_size": 2, "train.logging_steps": 1, "train.save_steps": 2,
                 "eval.max_examples": 2, "eval.max_new_tokens": 4, "eval.fewshot_k": 1, "eval.traces": False}
# Our own modules' Future/DeprecationWarnings as Python prints them (`PYTHONWARNINGS=default` shows the latter
# too).
OWN_WARNING = re.compile(r"mlflow_finetune_plugin[/\\]\S+\.py:\d+: (Future|Deprecation)Warning")


# ------------------------------------------------------------------------------------------------- the loss
# mask


@pytest.mark.parametrize("row", ROWS)
def test_the_trained_tokens_are_each_reply_and_its_end_of_turn(row):
    from mlflow_finetune_plugin.models.base import load_tokenizer
    from mlflow_finetune_plugin.models.chat_format import chat_format
    from mlflow_finetune_plugin.models.turn_spans import tokenize_row

    tokenizer = load_tokenizer(model_name(row))
    encoded = tokenize_row(tokenizer, CONVERSATION)
    pieces = trained_pieces(tokenizer, encoded["input_ids"], encoded["assistant_masks"])
    first, last = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    # What the template has the model write ahead of a reply (Qwen3's empty think block, gpt-oss's final
    # channel) is trained too: the model must write it at inference.
    expected = [EARLIER_LEAD.get(row, "") + first + EARLIER_END_OF_TURN.get(row, END_OF_TURN[row]),
                LAST_LEAD.get(row, "") + last + END_OF_TURN[row]]
    if row == "mistral":  # "[/INST] reply</s>": the space after [/INST] is the reply's first token's
        pieces = [p.removeprefix(" ") for p in pieces]
    assert pieces == expected
    # The system message reaches the row: kept by the template, or folded into the first user turn.
    assert "Answer in French." in tokenizer.decode(encoded["input_ids"])
    assert chat_format(tokenizer).system == ("folded" if row in FOLDS_SYSTEM else "kept")


@pytest.mark.parametrize("row", ROWS)
def test_every_end_of_turn_id_stops_generation(row):
    from transformers import GenerationConfig

    from mlflow_finetune_plugin.models.base import load_tokenizer, resolve_model_path
    from mlflow_finetune_plugin.models.chat_format import stop_ids

    tokenizer = load_tokenizer(model_name(row))
    generation = GenerationConfig.from_pretrained(resolve_model_path(model_name(row)))
    stops = set(stop_ids(tokenizer, generation))
    eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert tokenizer.convert_tokens_to_ids(END_OF_TURN[row]) in stops
    # Gemma's <eos>, Phi's <|endoftext|> as well as their turn ends
    assert {tokenizer.eos_token_id, *eos} <= stops


@pytest.mark.parametrize("pieces", [["<th", "ink>\n\n</th", "ink>\n\n", "La ", "gare"], ["La", " gare"],
                                    ["  <think>why</think>", " ", "Hi"], ["<thi"], ["<think>unclosed"],
                                    ["<", "b>"], ["\n", "Hello"]])
def test_a_streamed_answer_is_cleaned_as_a_whole_one(pieces):
    """The serving engines stream; Qwen3's empty reasoning block must not reach the page (pyfunc drops it
    too)."""
    from mlflow_finetune_plugin.models.answers import clean_answer, clean_stream

    streamed = list(clean_stream(iter(pieces)))
    assert "".join(streamed).strip() == clean_answer("".join(pieces))
    # Past the block, pieces stream as they come.
    assert list(clean_stream(iter(["<think>\n\n</think>\n\n", "La ", "gare"]))) == ["La ", "gare"]


def test_the_pre_flight_counts_the_tokens_an_answer_takes_as_the_template_has_it_written(tmp_path, capsys):
    """Qwen3 writes an empty <think></think> block ahead of each answer, inside eval.max_new_tokens: a budget
    that fits the answer alone cuts every Qwen3 answer short (exact_match 0.5 on the system-prompt set at 16
    tokens)."""
    from mlflow_finetune_plugin.backend import resolve_entry_point
    from mlflow_finetune_plugin.models.base import load_tokenizer

    project = write_chat_project(tmp_path, "budget")
    budget = max(len(load_tokenizer("tiny-qwen3")(f"That is {4 * i}.")["input_ids"]) for i in (50, 51)) + 1
    warned = {}
    for row in ("qwen2.5", "qwen3"):
        resolve_entry_point(str(project), "lora", {"model": model_name(row), "eval.max_new_tokens": budget})
        warned[row] = "longer than eval.max_new_tokens" in capsys.readouterr().err
    assert warned == {"qwen2.5": False, "qwen3": True}


@pytest.mark.parametrize("row", ROWS)
def test_rows_a_template_refuses_are_refused_before_any_run_with_the_fix(row, tmp_path):
    """Gemma 3's and Mistral's templates raise on turns that do not alternate; the others render them."""
    from mlflow_finetune_plugin.backend import resolve_entry_point
    from mlflow_finetune_plugin.errors import FinetuneError

    turns = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Anyone?"},
             {"role": "assistant", "content": "Yes."}]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps({"messages": turns}) + "\n")
    (tmp_path / "finetune.yaml").write_text("data: {train: data/train.jsonl, eval_split: 0}\n")
    if row not in ("gemma3", "mistral"):
        resolve_entry_point(str(tmp_path), "lora", {"model": model_name(row)})
        return
    with pytest.raises(FinetuneError) as refused:
        resolve_entry_point(str(tmp_path), "lora", {"model": model_name(row)})
    message = str(refused.value)
    assert f"train.jsonl:1: the chat template of {model_name(row)} rejects this row" in message
    assert "alternating" in message and "model.chat_template" in message


# ------------------------------------------------------------------------------------------- one run per
# family


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module, created here: the runs that share it start at once."""
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{tmp_path_factory.mktemp('matrix') / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    forget_active_experiment()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    MlflowClient().search_experiments()  # creates the tables
    yield uri
    mp.undo()
    forget_active_experiment()
    mlflow.set_tracking_uri(None)


def _wanted_rows(request, fixture: str) -> list[str]:
    """The rows whose selected tests in this module use `fixture` (a `-k` run starts only those)."""
    rows = [item.callspec.params["row"] for item in request.session.items
            if item.module is request.module and fixture in item.fixturenames and hasattr(item, "callspec")]
    return list(dict.fromkeys(rows))


@pytest.fixture(scope="module")
def runs(store, request, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """`mlflow run PROJECT -e lora --backend finetune` for each family, two at a time, each registering its
    model."""
    project = tmp_path_factory.mktemp("project")
    env = {**subprocess_env(store), "PYTHONWARNINGS": "default"}

    def one(row):
        folder = write_chat_project(project / row, registered_name(row))
        overrides = [f"{k}={v}" for k, v in {"model": model_name(row), **RUN_OVERRIDES}.items()]
        cmd = [sys.executable, "-m", "mlflow", "run", str(folder), "-e", "lora", "--backend", "finetune",
               *[a for o in overrides for a in ("-P", o)], "--experiment-name", f"matrix-{row}"]
        return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=900)

    with ThreadPoolExecutor(2) as pool:
        rows = _wanted_rows(request, "runs")
        return dict(zip(rows, pool.map(one, rows)))


def _run_of(row):
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name(f"matrix-{row}").experiment_id])
    return run


@pytest.mark.integration
@pytest.mark.parametrize("row", end_to_end(FAMILIES))
def test_mlflow_run_lora_trains_registers_and_says_what_the_loss_covered(runs, row):
    proc = runs[row]
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    run = _run_of(row)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tags.LOSS_ON] == "assistant" and 0 < float(run.data.tags[tags.LOSS_SHARE]) < 0.6
    handling = run.data.tags[tags.SYSTEM_HANDLING]
    assert handling.startswith("folded:" if row in FOLDS_SYSTEM else "kept"), handling
    assert ("System messages:" in output) is (row in FOLDS_SYSTEM)  # said once, where it happens
    assert "Loss on: each assistant reply and its end-of-turn token" in output
    assert "eval/tuned/exact_match" in run.data.metrics and "eval/base/loss" in run.data.metrics
    assert f"Registered {registered_name(row)} version 1" in output
    assert not OWN_WARNING.findall(output), OWN_WARNING.findall(output)


@pytest.fixture(scope="module")
def pyfuncs(runs):
    """Each family's registered version, loaded once through `mlflow.pyfunc` (models:/NAME/1)."""
    loaded = {}

    def get(row):
        if row not in loaded:
            assert runs[row].returncode == 0, (runs[row].stdout + runs[row].stderr)[-3000:]
            loaded[row] = mlflow.pyfunc.load_model(f"models:/{registered_name(row)}/1")
        return loaded[row]

    return get


@pytest.mark.integration
@pytest.mark.parametrize("row", end_to_end(FAMILIES))
def test_the_registered_version_reloads_answers_and_stops_at_the_end_of_turn(pyfuncs, row):
    from mlflow_finetune_plugin.evaluate.contenders import answer_and_score

    with own_warnings() as found:
        model = pyfuncs(row)
        (answer,) = model.predict([{"messages": QUESTION}], params={"max_new_tokens": 8})
        loaded = model.unwrap_python_model()._loaded
        # The evaluation's own path (one pass scores the references, generation continues from its cache)
        answers, nll, n_tokens = answer_and_score(loaded, [QUESTION] * 2, ["3 plus 3 is 6."] * 2, 8)
    assert not found, found
    assert isinstance(answer, str) and answers == [answer, answer] and nll > 0 and n_tokens > 0
    script = Script(loaded.tokenizer, END_OF_TURN[row])
    with script.forced():
        assert model.predict([{"messages": QUESTION}], params={"max_new_tokens": 12}) == [script.text]
    # Written into the logged model's generation config too (vLLM and the exported folder read it there).
    eos = loaded.model.generation_config.eos_token_id
    assert script.stop_id in (eos if isinstance(eos, list) else [eos])


@pytest.fixture(scope="module")
def engine(store):
    from mlflow_finetune_plugin.serving.transformers_engine import TransformersEngine

    eng = TransformersEngine(device="cpu", concurrency=2)
    yield eng
    eng.close()


@pytest.mark.integration
@pytest.mark.parametrize("row", end_to_end(FAMILIES))
def test_the_transformers_engine_and_the_playground_answer_and_stop(pyfuncs, engine, row):
    from mlflow_finetune_plugin.serving import ModelChoice, Settings
    from mlflow_finetune_plugin.serving.playground import Playground

    expected = pyfuncs(row).predict([{"messages": QUESTION}], params={"max_new_tokens": 8})[0]
    tuned, base = ModelChoice(registered_name(row), "1"), ModelChoice(registered_name(row), "1", base=True)
    with own_warnings() as found:
        assert engine.generate(tuned, QUESTION, Settings(0.0, 1.0, 8)) == expected
        result = Playground(engine, tuned, base).compare("What is 3 plus 3?", system_prompt="Answer briefly.",
                                                         max_new_tokens=8)
    assert not found, found
    assert (result["a"]["answer"], result["a"]["error"], result["b"]["error"]) == (expected, None, None)
    script = Script(pyfuncs(row).unwrap_python_model()._loaded.tokenizer, END_OF_TURN[row])
    with script.forced():
        assert engine.generate(tuned, QUESTION, Settings(0.0, 1.0, 12)) == script.text
        assert engine.generate(base, QUESTION, Settings(0.0, 1.0, 12)) == script.text


@pytest.mark.integration
@pytest.mark.parametrize("row", end_to_end(FAMILIES))
def test_export_merged_answers_as_the_pyfunc_and_its_generation_config_stops(pyfuncs, row, tmp_path):
    import torch
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlflow_finetune_plugin.cli import main
    from mlflow_finetune_plugin.logged_model import LoadedModel, generate
    from mlflow_finetune_plugin.models.chat_format import prompt_ids

    expected = pyfuncs(row).predict([{"messages": QUESTION}], params={"max_new_tokens": 8})[0]
    out = tmp_path / "export"
    result = CliRunner().invoke(main, ["export", f"models:/{registered_name(row)}/1", "--to", str(out)])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "adapter_config.json" not in {p.name for p in out.iterdir()}
    with own_warnings() as found:
        assert generate(LoadedModel(merged, tokenizer, {}), QUESTION, max_new_tokens=8) == expected
    assert not found, found
    # A plain transformers `generate`, nothing of ours: the folder's generation config ends the answer at the
    # end of turn; told another stop id, the same script runs on to the token limit.
    script = Script(tokenizer, END_OF_TURN[row])
    ids = torch.tensor([prompt_ids(tokenizer, QUESTION)])
    with script.forced(), torch.no_grad():
        stopped = merged.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
        other = next(i for i in range(len(tokenizer)) if i not in (*script.ids, script.fill))
        ran_on = merged.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=other,
                                 pad_token_id=other)[0, ids.shape[1]:].tolist()
    assert stopped == script.ids
    assert len(ran_on) == 12 and ran_on[len(script.ids)] == script.fill


# ------------------------------------------------------------------------------------------------------------
# DPO


def _preference_rows() -> list[dict]:
    system = {"role": "system", "content": "Answer in French."}
    return [{"prompt": [system, {"role": "user", "content": q}], "chosen": [{"role": "assistant",
                                                                             "content": good}],
             "rejected": [{"role": "assistant", "content": bad}]} for q, good,
            bad in (("Where is the station?", "La gare est ici.", "The station is here."),
                    ("What time is it?", "Il est midi.", "It is noon."), ("How are you?", "Je vais bien.",
                                                                          "I am fine."),
                    ("What is your name?", "Je m'appelle Nimbus.", "My name is Nimbus."))]


@pytest.mark.integration
@pytest.mark.parametrize("row", end_to_end(ROWS))
def test_dpo_trains_on_the_family(store, row, tmp_path):
    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.train.job import run

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _preference_rows()))
    mlflow.set_experiment(f"matrix-dpo-{row}")
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the checkpoints folder
    try:
        recipe = load_recipe(REPO / "recipes" / "dpo", method="dpo", overrides={
            "model.name": model_name(row), "data.train": str(data), "data.eval": str(data),
            "train.max_steps": 2, "train.batch_size": 2, "train.logging_steps": 1, "eval.enabled": False,
            "registry.enabled": False})
        assert run(recipe) == 0
    finally:
        os.chdir(cwd)
    client = MlflowClient()
    (dpo,) = client.search_runs([client.get_experiment_by_name(f"matrix-dpo-{row}").experiment_id])
    assert dpo.info.status == "FINISHED" and dpo.data.params["objective"] == "dpo"
    assert any(k.startswith("train/rewards/") for k in dpo.data.metrics), sorted(dpo.data.metrics)
    # DPO's trainer renders the rows itself: the system message reaches it folded where the template would
    # drop it.
    assert dpo.data.tags[tags.SYSTEM_HANDLING].startswith("folded:" if row in FOLDS_SYSTEM else "kept")
