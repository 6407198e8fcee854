"""GRPO: prompt-only data, reward functions (built-in and the project's own), the recipe checks, and real
(tiny) training and evaluation with the curves and metrics logged to MLflow."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch

from mlflow_finetune_plugin.config.schema import DataConfig, EvalConfig, GRPOConfig, ModelConfig, TrainConfig
from mlflow_finetune_plugin.data.read import DataError, detect_format, load_training_dataset, read_records
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.train.rewards.builtins import exact_answer, json_schema, regex
from mlflow_finetune_plugin.train.rewards.calling import score
from mlflow_finetune_plugin.train.rewards.loader import load_rewards
from tests.helpers import jsonl

SYSTEM = "Reply with the number only."


def _recipe(project_dir, rewards=("exact_answer",), **grpo) -> SimpleNamespace:
    """What an objective reads of a recipe, as the pipeline will hand it over."""
    grpo = {"num_generations": 2, "max_completion_length": 8, **grpo}
    return SimpleNamespace(
        grpo=GRPOConfig(rewards=list(rewards), **grpo), model=ModelConfig(),
        data=DataConfig(train=None, max_length=128, system_prompt=SYSTEM),
        train=TrainConfig(batch_size=4, grad_accum=1, max_steps=2, learning_rate=1e-2, logging_steps=1),
        eval=EvalConfig(max_examples=4, max_new_tokens=6, batch_size=4, fewshot_k=2),
        project_dir=str(project_dir))


def _sums(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": f"What is {i} + {i + 1}?", "answer": 2 * i + 1} for i in range(offset, offset + n)]


# ---------------------------------------------------------------- rewards


def test_builtin_rewards_score_hand_made_completions():
    completions = ["68", "The answer is 68.", "23 + 45 = 68", "68 or 69", " <answer>1,234</answer> then 5 ",
                   "Paris.", "paris", [{"role": "assistant", "content": "-3.50"}], "no number"]
    answers = [68, "68", "68", 68, "1234", "Paris", "London", -3.5, None]
    # the last number of the final answer for numeric answers, the whole text (case-insensitive) for others;
    # a row without an answer is not scored (None)
    assert exact_answer(None, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, None]

    tagged = ["<answer>5</answer>", "5", "x <answer>7</answer> y",
              [{"role": "assistant", "content": "<answer>\n8</answer>"}]]
    assert regex(None, tagged, pattern=r"<answer>.*</answer>") == [1.0, 0.0, 1.0, 1.0]
    assert regex(None, tagged, pattern=r"<answer>.*</answer>", fullmatch=True) == [1.0, 0.0, 0.0, 1.0]

    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}
    answers = ['{"a": 1}', "a: 1", '{"a": "x"}', '```json\n{"a": 2}\n```', '{"b": 1}']
    assert json_schema(None, answers, schema=schema) == [1.0, 0.0, 0.0, 1.0, 0.0]
    # one schema per row (the `schema` column: an object, or its JSON text; an unreadable one scores None)
    per_row = [{"type": "array"}, '{"type": "object"}', "{not json"]
    assert json_schema(None, ["[1]", "[1]", "{}"], schema=per_row) == [1.0, 0.0, None]
    assert json_schema(None, ["{}", "nope"]) == [1.0, 0.0]  # no schema: any JSON


def test_recipe_rewards_load_with_weights_parameters_and_unique_names(tmp_path):
    (tmp_path / "rewards.py").write_text(
        "def brevity(prompts, completions, **kwargs):\n    return [1.0 / (1 + len(c)) for c in "
        "completions]\n\ndef needs_hint(prompts, completions, hint):\n    return [float(h in c) for c, h in "
        "zip(completions, hint)]\n\ndef helper_not_a_reward(x):\n    return x\n\nLIMIT = 3\n")
    (tmp_path / "checks.py").write_text("def shout(prompts, completions, **kw):\n"
                                        "    return [float(c.isupper()) for c in completions]\n")
    rewards = load_rewards(["exact_answer", {"name": "brevity", "weight": 2}, "checks.py:shout",
                            {"name": "regex", "pattern": "^\\d+$", "weight": 0.5},
                            {"name": "regex", "pattern": "x"}, "needs_hint"], tmp_path)
    assert [(r.name, r.weight) for r in rewards] == [
        ("exact_answer", 1.0), ("brevity", 2.0), ("shout", 1.0), ("regex", 0.5), ("regex_2", 1.0),
        ("needs_hint", 1.0)]
    assert [r.func.__name__ for r in rewards] == [r.name for r in rewards]  # TRL logs rewards/<__name__>/mean
    assert rewards[0].columns == ("answer",) and rewards[5].columns == ("hint",)

    # TRL's keyword arguments reach a function without **kwargs only where it takes them
    totals, per_fn = score(rewards, ["p", "p"], ["12", "AB"], {"answer": [12, 3], "hint": ["1", "A"],
                                                                "completion_ids": [[1], [2]],
                                                               "trainer_state": None})
    assert per_fn == {"exact_answer": [1.0, 0.0], "brevity": [1 / 3, 1 / 3], "shout": [0.0, 1.0],
                      "regex": [1.0, 0.0], "regex_2": [0.0, 0.0], "needs_hint": [1.0, 1.0]}
    assert totals == pytest.approx([1 + 2 / 3 + 0 + 0.5 + 0 + 1, 0 + 2 / 3 + 1 + 0 + 0 + 1])


def test_unknown_reward_names_list_builtins_and_project_functions(tmp_path):
    (tmp_path / "rewards.py").write_text("def brevity(prompts, completions, **kwargs):\n    return []\n\n"
                                         "def strict(prompts, completions):\n    return []\n\n"
                                         "def _private(prompts, completions):\n    return []\n\nLIMIT = 3\n")
    with pytest.raises(FinetuneError) as err:
        load_rewards(["brevty", "LIMIT", "missing.py:f", {"name": "regex"}, {"weight": 1},
                      {"name": "brevity", "weight": "high"}, {"name": "strict", "strength": 2}], tmp_path)
    text = str(err.value)
    assert text.startswith("7 problems with the reward functions:")
    assert (
        "grpo.rewards[0]: unknown reward 'brevty'. Built-ins: exact_answer, regex, json_schema; functions in "
        "rewards.py: brevity, strict. Did you mean `brevity`?") in text
    assert "grpo.rewards[1]: 'LIMIT' in rewards.py is not a function (it is a int)" in text
    assert f"grpo.rewards[2]: 'missing.py:f': file not found: {tmp_path / 'missing.py'}" in text
    assert "grpo.rewards[3] (regex): needs pattern" in text
    assert "grpo.rewards[4]: a mapping needs `name`" in text
    assert "grpo.rewards[5] (brevity): weight must be a number, got 'high'" in text
    assert ("grpo.rewards[6] (strict): strict() has no parameter strength (it takes prompts, "
            "completions)") in text

    with pytest.raises(FinetuneError, match=r"no rewards.py in .*Did you mean `exact_answer`"):
        load_rewards(["exact_answr"], tmp_path / "elsewhere")
    (tmp_path / "broken.py").write_text("def f(prompts, completions):\n    return [\n")
    with pytest.raises(FinetuneError, match=r"broken.py:2: cannot import it: SyntaxError"):
        load_rewards(["broken.py:f"], tmp_path)
    (tmp_path / "odd.py").write_text("def f(text):\n    return [1.0]\n")
    with pytest.raises(FinetuneError,
                       match=r"takes \(prompts, completions, \*\*kwargs\) by name; it takes \(text\)"):
        load_rewards(["odd.py:f"], tmp_path)


def test_a_reward_that_raises_is_a_finetune_error_naming_function_and_prompt(tmp_path):
    (tmp_path / "rewards.py").write_text(
        "def picky(prompts, completions, answer, **kwargs):\n"
        "    return [1.0 / int(a) for a in answer]\n\n"
        "def wrong_length(prompts, completions, **kwargs):\n    return [1.0]\n\n"
        "def text(prompts, completions, **kwargs):\n    return ['good' for _ in completions]\n")
    picky, wrong_length, text = load_rewards(["picky", "wrong_length", "text"], tmp_path)
    prompts = [[{"role": "system", "content": "S"}, {"role": "user", "content": "What is 1 + 1?"}],
               [{"role": "user", "content": "What is 0 + 0? " + "Think hard. " * 20}]]
    with pytest.raises(FinetuneError) as err:
        picky.func(prompts=prompts, completions=["2", "0"], answer=[2, 0], trainer_state=None)
    # the row it fails on found, its prompt's last user turn shortened to 80 characters, the original error
    # kept
    assert str(err.value) == (
        "reward function 'picky' failed on the prompt 'What is 0 + 0? Think hard. Think hard. "
        "Think hard. Think hard. Think hard. Th...': ZeroDivisionError: float division by zero")
    assert isinstance(err.value.__cause__, ZeroDivisionError)
    with pytest.raises(FinetuneError, match="'wrong_length' returned 1 rewards for 2 completions"):
        wrong_length.func(prompts=prompts, completions=["2", "0"])
    with pytest.raises(FinetuneError, match="'text' returned 'good' \\(str\\) among its rewards"):
        text.func(prompts=prompts, completions=["2", "0"])


# ---------------------------------------------------------------- data


def test_prompt_only_rows_load_as_messages_with_their_other_columns(tmp_path):
    rows = [{"prompt": "What is 1 + 2?", "answer": 3},
            {"prompt": [{"role": "user", "content": "Give JSON."}], "schema": {"type": "object"},
             "answer": "{}"}, {"prompt": "Hi", "system": "Be brief.", "answer": None,
                               "schema": {"type": "object", "required": ["a"]}}]
    path = jsonl(tmp_path / "p.jsonl", rows)
    assert detect_format(read_records(path), path) == "prompt_only"
    ds, fmt = load_training_dataset(path, system_prompt=SYSTEM)
    assert fmt == "prompt_only" and ds.column_names == ["prompt", "answer", "schema"]
    # every row has every column; answers mixing numbers and text are all text (exact_answer compares text
    # anyway)
    assert ds[0] == {"prompt": [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": "What is 1 + 2?"}], "answer": "3", "schema": None}
    assert ds[1]["schema"] == {"type": "object"} and ds[1]["answer"] == "{}"
    # the row's own system prompt wins
    assert ds[2]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert ds[2]["schema"] == {"type": "object", "required": ["a"]}

    # a prompt with a completion is still prompt_completion data, not ambiguous
    pc = jsonl(tmp_path / "pc.jsonl", [{"prompt": "q", "completion": "a"}])
    assert detect_format(read_records(pc), pc) == "prompt_completion"

    bad = jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "ok"}, {"prompt": "  "}, {"prompt": [{"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": "a"}]},
        {"prompt": [{"role": "wizard", "content": "q"}]}, {"prompt": 5}])
    with pytest.raises(DataError) as err:
        load_training_dataset(bad, fmt="prompt_only")
    assert str(err.value).splitlines()[1:] == [
        f"  {bad}:2: 'prompt' is empty",
        f"  {bad}:3: 'prompt' ends with a 'assistant' message: the model answers the last user turn, so end "
        "the prompt with a user message",
        f"  {bad}:4: prompt[0]: unknown role 'wizard' (valid: system, user, assistant, tool)",
        f"  {bad}:5: 'prompt' must be a string, got a number"]


# ---------------------------------------------------------------- the objective


def test_check_names_the_keys_to_change_before_any_model_loads(tmp_path):
    from mlflow_finetune_plugin.config.checks import grpo_problems
    from mlflow_finetune_plugin.train.objectives import grpo

    assert grpo.check(_recipe(tmp_path)) == [] and grpo_problems(_recipe(tmp_path)) == []
    recipe = _recipe(tmp_path, rewards=["exact_answer", "brevity"], num_generations=3,
                     max_completion_length=200)
    recipe.data.train = jsonl(tmp_path / "data" / "train.jsonl", [{"prompt": "q"}])  # no `answer` column
    # what needs the project's code: its reward functions and the columns they read
    problems = grpo.check(recipe)
    assert len(problems) == 2
    assert problems[0].startswith("grpo.rewards[1]: unknown reward 'brevity'")
    assert problems[1].startswith("data.train: reward 'exact_answer' needs the column answer")
    problems = grpo_problems(recipe)  # what the recipe alone decides, refused when it loads
    assert len(problems) == 2
    assert problems[0].startswith(
        "grpo.num_generations (3) must divide the completions of one optimizer step, "
        "train.batch_size x train.grad_accum = 4 x 1 = 4")
    assert problems[0].endswith(
        "Set train.batch_size to 6 (a multiple of 3), or grpo.num_generations to a divisor "
        "of 4 (2, 4)")
    assert problems[1].startswith("grpo.max_completion_length (200) leaves no room for the prompt in "
                                  "data.max_length (128)")


def _tiny_lora():
    from peft import LoraConfig, get_peft_model

    from mlflow_finetune_plugin.models.base import load_base_model, load_tokenizer

    torch.manual_seed(0)
    model = load_base_model(ModelConfig())
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8,
                                            target_modules=["q_proj", "v_proj"])), load_tokenizer()


def _args(tmp_path) -> dict:
    """TrainingArguments as the pipeline passes them (checkpointing off, as train.gradient_checkpointing's
    default; TRL's own default is on)."""
    from transformers import TrainingArguments

    checkpointing = ("activation_checkpointing"
                     if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                     else "gradient_checkpointing")
    return dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                **{checkpointing: False}, per_device_eval_batch_size=4, gradient_accumulation_steps=1,
                learning_rate=1e-2, logging_steps=1, logging_first_step=True, save_steps=100,
                eval_strategy="steps", eval_steps=100, use_cpu=True, bf16=False, report_to="none",
                dataloader_num_workers=0, seed=0)


def test_grpo_trains_an_adapter_and_logs_reward_kl_and_length_curves(tmp_path, tracking_uri):
    from mlflow_finetune_plugin.train.callbacks import CheckpointLogger, MlflowMetrics
    from mlflow_finetune_plugin.train.objectives import grpo

    # varies between samples, so the advantages and the update are not 0
    (tmp_path / "rewards.py").write_text(
        "def longer(prompts, completions, **kwargs):\n"
        "    return [len(c[-1]['content']) / 50 for c in completions]\n")
    recipe = _recipe(tmp_path, rewards=["exact_answer", {"name": "longer", "weight": 0.5}])
    train_ds, _ = load_training_dataset(jsonl(tmp_path / "train.jsonl", _sums(8)), system_prompt=SYSTEM)
    model, tokenizer = _tiny_lora()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    with mlflow.start_run() as run:
        trainer = grpo.build_trainer(recipe, model, tokenizer, train_ds, None, _args(tmp_path),
                                     [MlflowMetrics(), CheckpointLogger()])
        assert trainer.args.eval_strategy == "no" and trainer.args.beta == 0.04
        assert trainer.reward_func_names == ["exact_answer", "longer"]
        trainer.train()
    history = mlflow.MlflowClient().get_metric_history
    for name in ("train/reward", "train/rewards/exact_answer/mean", "train/rewards/longer/mean", "train/kl",
                 "train/completions/mean_length"):
        assert [m.step for m in history(run.info.run_id, name)] == [1, 2], name
    assert all(0 <= m.value <= 8 for m in history(run.info.run_id, "train/completions/mean_length"))
    assert list(model.peft_config) == ["default"]  # TRL's frozen `ref` copy (beta > 0) is gone before logging
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)


def test_long_prompts_are_left_out_and_reward_columns_are_checked(tmp_path, capsys):
    from mlflow_finetune_plugin.train.objectives import grpo

    rows = [*_sums(3), {"prompt": "What is " + " + ".join(["1"] * 200) + "?", "answer": 200}]
    train_ds, _ = load_training_dataset(jsonl(tmp_path / "train.jsonl", rows), system_prompt=SYSTEM)
    model, tokenizer = _tiny_lora()
    trainer = grpo.build_trainer(_recipe(tmp_path), model, tokenizer, train_ds, None, _args(tmp_path), [])
    assert len(trainer.train_dataset) == 3
    assert (
        "1 of 4 training prompts are longer than data.max_length - grpo.max_completion_length = 120 tokens"
        in capsys.readouterr().err
    )
    no_answers = train_ds.remove_columns("answer")
    with pytest.raises(FinetuneError, match="data.train: reward 'exact_answer' needs the column answer"):
        grpo.build_trainer(_recipe(tmp_path), model, tokenizer, no_answers, None, _args(tmp_path), [])
    # TRL would silently train 0 steps on fewer prompts than one batch takes (4 completions / 2 per prompt)
    with pytest.raises(FinetuneError,
                       match="data.train: 1 prompt to train on, fewer than one batch takes: .* = 4 / 2 = 2"):
        grpo.build_trainer(_recipe(tmp_path), model, tokenizer, train_ds.select([0]), None, _args(tmp_path),
                           [])


def test_a_reward_raising_during_training_ends_it_with_a_finetune_error(tmp_path):
    from mlflow_finetune_plugin.train.objectives import grpo

    (tmp_path / "rewards.py").write_text("def boom(prompts, completions, answer, **kwargs):\n"
                                         "    return [1 / (a - 1) for a in answer]\n")
    train_ds, _ = load_training_dataset(jsonl(tmp_path / "train.jsonl", _sums(2)), system_prompt=SYSTEM)
    model, tokenizer = _tiny_lora()
    trainer = grpo.build_trainer(_recipe(tmp_path, rewards=["boom"]), model, tokenizer, train_ds, None,
                                 _args(tmp_path), [])
    with pytest.raises(FinetuneError,
                       match=r"^reward function 'boom' failed on the prompt 'What is 0 \+ 1\?': "
                             r"ZeroDivisionError: division by zero$"):
        trainer.train()


def test_the_bundled_grpo_recipe_checks_clean_with_its_data_and_rewards():
    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.train.objectives import grpo
    from tests.helpers import REPO

    recipe = load_recipe(REPO / "recipes" / "grpo")
    assert recipe.objective == "grpo" and recipe.data.format == "prompt_only"
    assert grpo.check(recipe) == []
    train_ds, _ = load_training_dataset(recipe.data.train, recipe.data.format, recipe.data.system_prompt)
    assert len(train_ds) == 104 and train_ds.column_names == ["prompt", "answer"]
    exact, brevity = load_rewards(recipe.grpo.rewards, recipe.project_dir)
    completions = [[{"role": "assistant", "content": c}] for c in ("125", "The sum is 125.", "")]
    assert brevity.weight == 0.25
    assert brevity.func(prompts=[None] * 3, completions=completions) == [1.0, 1 - len("The sum is") / 40, 0.0]


def test_evaluate_scores_every_contender_with_the_rewards(tmp_path, tracking_uri, capsys):
    from mlflow_finetune_plugin.train.objectives import grpo

    recipe = _recipe(tmp_path, rewards=["exact_answer", {"name": "regex", "pattern": "\\d", "weight": 0.5}])
    train_ds, _ = load_training_dataset(jsonl(tmp_path / "train.jsonl", _sums(6)), system_prompt=SYSTEM)
    eval_ds, _ = load_training_dataset(jsonl(tmp_path / "eval.jsonl", _sums(5, 50)), system_prompt=SYSTEM)
    model, tokenizer = _tiny_lora()
    with mlflow.start_run() as run:
        grpo.evaluate(recipe, model, tokenizer, train_ds, eval_ds)
    metrics = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
    for contender in ("base", "fewshot", "tuned"):
        exact, digit = metrics[f"eval/{contender}/reward_exact_answer"], metrics[
            f"eval/{contender}/reward_regex"]
        assert metrics[f"eval/{contender}/reward"] == pytest.approx(exact + 0.5 * digit)
        # the `answer` column is the text metrics' reference
        assert f"eval/{contender}/exact_match" in metrics
    assert metrics["eval/n_examples"] == 4  # eval.max_examples
    assert "reward_exact_answer" in capsys.readouterr().out  # in the printed comparison table

    # no `answer` column: the rewards that need none still score; no text metric against empty references
    recipe = _recipe(tmp_path, rewards=[{"name": "regex", "pattern": "\\d"}])
    with mlflow.start_run() as run:
        grpo.evaluate(recipe, model, tokenizer, train_ds.remove_columns("answer"),
                      eval_ds.remove_columns("answer"))
    metrics = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
    assert sorted(metrics) == ["eval/base/answer_tokens", "eval/base/reward", "eval/base/reward_regex",
                               "eval/n_examples", "eval/tuned/answer_tokens", "eval/tuned/kl_to_base",
                               "eval/tuned/reward", "eval/tuned/reward_regex"]
    # a fresh LoRA adapter (B = 0) is the base: the check reads 0
    assert metrics["eval/tuned/kl_to_base"] == 0.0


# ---------------------------------------------------------------- end to end: `-e grpo` as a user runs it


def _grpo_project(root: Path, rewards_py: str = "") -> Path:
    jsonl(root / "data" / "train.jsonl", _sums(8))
    jsonl(root / "data" / "eval.jsonl", _sums(2, 40))
    (root / "rewards.py").write_text(rewards_py or "def length(prompts, completions, **kwargs):\n"
                                     "    return [len(c[-1]['content']) / 40 for c in completions]\n")
    (root / "finetune.yaml").write_text(
        "data: {train: data/train.jsonl, eval: data/eval.jsonl, max_length: 64}\n"
        "grpo: {rewards: [exact_answer, length], num_generations: 2, max_completion_length: 6}\n"
        "train: {max_steps: 2, batch_size: 2, logging_steps: 1, learning_rate: 1.0e-2}\n"
        "eval: {max_examples: 2, max_new_tokens: 4, fewshot_k: 1}\n")
    return root


def test_grpo_continues_a_registered_lora_version(tmp_path, tracking_uri):
    """`-e grpo -P model.init_adapter=models:/NAME@challenger`: reinforcement on top of an SFT version."""
    from mlflow_finetune_plugin.backend import resolve_entry_point
    from mlflow_finetune_plugin.train.job import run
    from tests.helpers import chat_rows, write_project

    sft = write_project(tmp_path / "sft", "train: {max_steps: 2, batch_size: 2}\neval: {enabled: false}\n",
                        rows=chat_rows(4))
    recipe, _ = resolve_entry_point(str(sft), "lora", {})
    assert run(recipe) == 0
    project = _grpo_project(tmp_path / "rl")
    recipe, _ = resolve_entry_point(str(project), "grpo", {"model.init_adapter": "models:/sft@challenger"})
    assert (recipe.objective, recipe.adapter.type) == ("grpo", "lora")
    assert run(recipe) == 0
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("rl", "challenger")
    assert version.tags["finetune.objective"] == "grpo" and version.tags["finetune.method"] == "grpo"
    run_ = client.get_run(version.run_id)
    assert {"train/reward", "train/kl", "eval/tuned/reward", "eval/base/reward"} <= set(run_.data.metrics)
    # the version is an ordinary LoRA adapter of the SFT version's base
    sft_version = client.get_model_version_by_alias("sft", "challenger")
    assert version.tags["finetune.base_model"] == sft_version.tags["finetune.base_model"]


def test_a_reward_that_raises_ends_the_run_failed_naming_it(tmp_path, tracking_uri, capsys):
    from mlflow_finetune_plugin.backend import resolve_entry_point
    from mlflow_finetune_plugin.train.job import run

    project = _grpo_project(tmp_path / "bad", "def length(prompts, completions, **kwargs):\n"
                                              "    raise ValueError('no scores today')\n")
    recipe, _ = resolve_entry_point(str(project), "grpo", {})
    assert run(recipe) == 1
    (failed,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert failed.info.status == "FAILED"
    error = failed.data.tags["finetune.error"]
    assert "length" in error and "no scores today" in error and "What is" in error, error
    assert "Traceback" not in capsys.readouterr().err
