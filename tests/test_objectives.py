"""The objective axis over the adapters and the quantization: every combination the recipe allows trains (one
step of the objective's own TRL trainer on the tiny model), and every combination refused by design is refused
before a model loads, with the reason. End to end, the combinations the presets did not offer before: QLoRA +
DPO, IA3 on a mixture, continuing a registered adapter, and the reference-free preference objectives (ORPO,
SimPO)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from mlflow_finetune_plugin.backend import resolve_entry_point
from mlflow_finetune_plugin.config.checks import OBJECTIVE_FORMATS, SCORING
from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.config.presets import PRESETS
from mlflow_finetune_plugin.data.splits import load_splits
from mlflow_finetune_plugin.errors import FinetuneError, RecipeError
from mlflow_finetune_plugin.models.base import load_base_model, load_tokenizer
from mlflow_finetune_plugin.train import quantization
from mlflow_finetune_plugin.train.adapters import ADAPTERS, adapter_of, attach
from mlflow_finetune_plugin.train.job import run
from mlflow_finetune_plugin.train.objectives import NAMES, objective_of
from mlflow_finetune_plugin.train.trainers import training_arguments
from tests.helpers import FAST_OVERRIDES, chat_rows, jsonl

FAST = FAST_OVERRIDES


def _rows(objective: str, n: int, offset: int = 0) -> list[dict]:
    """Rows in the format the objective trains on."""
    formats = OBJECTIVE_FORMATS[objective]
    if "prompt_only" in formats:  # GRPO's own format first (it takes pairs too: tests/test_rlhf.py)
        return [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}], "answer": str(2 * i)}
                for i in range(offset, offset + n)]
    if "preference" in formats:
        return [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
                 "chosen": [{"role": "assistant", "content": f"{2 * i}"}],
                 "rejected": [{"role": "assistant", "content": "I don't know."}]}
                for i in range(offset, offset + n)]
    return chat_rows(n, offset)


def _project(root: Path, objective: str) -> Path:
    jsonl(root / "data" / "train.jsonl", _rows(objective, 8))
    jsonl(root / "data" / "eval.jsonl", _rows(objective, 2, 50))
    # The tiny model's random answers never hold the right sum: a length reward gives GRPO's groups a spread.
    (root / "rewards.py").write_text("def length(prompts, completions, **kwargs):\n"
                                     "    return [len(c if isinstance(c, str) else c[0]['content']) / 40 "
                                     "for c in completions]\n")
    (root
     / "finetune.yaml").write_text("data: {train: data/train.jsonl, eval: data/eval.jsonl, max_length: 64}\n"
                                   "grpo: {num_generations: 2, max_completion_length: 8, "
                                   "rewards: [exact_answer, length]}\n")
    return root


# Combinations refused by design (the recipe check says why); every other one is in the matrix below.
REFUSED = {("full", "4bit"), ("bottleneck", "4bit")}
# TRL's experimental pair trainers score logits position by position; prompt tuning's virtual tokens shift
# them. A reward model's score head reads the last token; prefix and prompt tuning prepend positions, and
# PEFT's bottleneck tuner has no sequence-classification task (config/checks.py: SCORING_ADAPTERS).
REFUSED_OBJECTIVES = {("prompt", "orpo"), ("prompt", "simpo")}
REFUSED_REWARD = {("prefix", "reward"), ("prompt", "reward"), ("bottleneck", "reward")}
MATRIX = [(a, o, q) for o in NAMES for a in ADAPTERS for q in ("none", "4bit")
          if (a, q) not in REFUSED and (a, o) not in REFUSED_OBJECTIVES | REFUSED_REWARD
          and (q == "none" or a in ("lora", "ia3") and o not in SCORING)]


@pytest.mark.parametrize("adapter, objective, quant", MATRIX, ids=["-".join(c) for c in MATRIX])
def test_every_adapter_trains_with_every_objective(adapter, objective, quant, tmp_path):
    overrides = {**FAST, "adapter.type": adapter, "objective": objective, "model.quantization": quant,
                 "train.learning_rate": 1e-2}
    recipe = load_recipe(_project(tmp_path, objective), overrides=overrides)
    # the pre-flight checks pass, data included
    recipe, _ = resolve_entry_point(str(tmp_path), "main", overrides)
    data = load_splits(recipe)
    torch.manual_seed(0)
    model = load_base_model(recipe.model, scoring=recipe.objective in SCORING,
                            **quantization.model_kwargs(recipe.model))
    tokenizer = load_tokenizer()
    model.config.pad_token_id = tokenizer.pad_token_id
    model = attach(quantization.prepare(model, recipe.model), recipe)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    args = {**training_arguments(recipe, f"m-{adapter}-{objective}-{quant}", None), "save_strategy": "no"}
    trainer = objective_of(recipe).build_trainer(recipe, model, tokenizer, data.train, None, args, [])
    trainer.train()
    assert trainer.state.global_step == 2
    changed = [n for n,
               p in trainer.model.named_parameters() if n in trainable and not torch.equal(trainable[n], p)]
    assert changed, f"{adapter} x {objective} x {quant}: no trainable parameter moved"


def test_matrix_covers_every_adapter_objective_and_quantization():
    assert {a for a, _, _ in MATRIX} == set(ADAPTERS) and {o for _, o, _ in MATRIX} == set(NAMES)
    assert {q for _, _, q in MATRIX} == {"none", "4bit"}
    assert set(OBJECTIVE_FORMATS) == set(NAMES)  # every objective says which data it trains on
    # every adapter x objective pair either trains (unquantized) or is refused, never left out silently
    trained = {(a, o) for a, o, q in MATRIX if q == "none"}
    assert trained | REFUSED_OBJECTIVES | REFUSED_REWARD == {(a, o) for a in ADAPTERS for o in NAMES}
    assert not trained & (REFUSED_OBJECTIVES | REFUSED_REWARD)
    assert set(PRESETS) == {"lora", "qlora", "adapter", "prefix", "prompt", "ia3", "full", "multitask", "dpo",
                            "grpo", "reward", "kto", "distill", "optimize-prompt"}


@pytest.mark.parametrize("overrides, method, reason", [
    ({"model.quantization": "4bit"}, "full", "no gradients"),
    ({"model.quantization": "8bit"}, "adapter", "PEANuT"),
    ({"data.packing": True}, "prefix", "prepended once per row"),
    ({"data.packing": True}, "prompt", "prepended once per row"),
    ({"model.init_adapter": "models:/x/1"}, "full", "no adapter to continue"),
    ({"data.adapters": "per_task"}, "lora", "needs a mixture"),
])
def test_nonsense_combinations_are_refused_before_a_model_loads(overrides, method, reason, tmp_path):
    _project(tmp_path, "sft")
    with pytest.raises(FinetuneError) as info:
        resolve_entry_point(str(tmp_path), method, overrides)
    assert reason in str(info.value)


@pytest.mark.parametrize("adapter, objective", sorted(REFUSED_OBJECTIVES), ids=["-".join(c) for c in
                                                                                 sorted(REFUSED_OBJECTIVES)])
def test_prompt_tuning_is_refused_for_the_reference_free_objectives(adapter, objective, tmp_path):
    _project(tmp_path, objective)
    with pytest.raises(FinetuneError) as info:
        resolve_entry_point(str(tmp_path), "main", {"adapter.type": adapter, "objective": objective})
    assert f"adapter.type: prompt cannot be used with objective: {objective}" in str(info.value)
    assert "virtual tokens shift them" in str(info.value)


def test_a_mixture_is_refused_for_preference_and_reward_objectives(tmp_path):
    root = _project(tmp_path, "sft")
    jsonl(root / "data" / "b.jsonl", chat_rows(4, 20))
    tasks = "{a: {train: data/train.jsonl}, b: {train: data/b.jsonl}}"
    with pytest.raises(RecipeError,
                       match="continuing an adapter is not supported with data.adapters: per_task"):
        load_recipe(root, overrides={"data.tasks": tasks, "data.adapters": "per_task",
                                     "model.init_adapter": "models:/bot@champion"})
    for objective in ("dpo", "orpo", "simpo", "grpo", "reward", "kto"):
        with pytest.raises(RecipeError, match=f"mixtures train with the sft objective; {objective}"):
            load_recipe(root, overrides={"data.tasks": tasks, "objective": objective})


def test_qlora_plus_dpo_end_to_end(tmp_path, tracking_uri):
    """`-e dpo -P model.quantization=4bit`: DPO on a 4-bit base, logged and registered as a plain LoRA
    adapter."""
    recipe = load_recipe(_project(tmp_path / "qdpo", "dpo"), method="dpo",
                         overrides={**FAST, "model.quantization": "4bit"})
    assert (recipe.adapter.type, recipe.objective, recipe.model.quantization) == ("lora", "dpo", "4bit")
    assert run(recipe) == 0
    version = mlflow.MlflowClient().get_model_version_by_alias("qdpo", "challenger")
    tags = version.tags
    assert (tags["finetune.method"], tags["finetune.objective"], tags["finetune.quantization"]) == ("dpo",
                                                                                                    "dpo",
                                                                                                    "4bit")
    metrics = mlflow.get_run(version.run_id).data.metrics
    assert "eval/tuned/pref_margin" in metrics and "eval/start/pref_accuracy" in metrics


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_reference_free_preference_end_to_end(objective, tmp_path, tracking_uri):
    """`-e dpo -P objective=orpo` (or simpo): TRL's ORPO / SimPO trainer with no reference model, logged and
    registered as a LoRA adapter, evaluated as DPO is; the resolved recipe keeps only the active objective's
    section."""
    name = f"ref-free-{objective}"
    recipe = load_recipe(_project(tmp_path / name, objective), method="dpo",
                         overrides={**FAST, "objective": objective})
    assert (recipe.adapter.type, recipe.objective, recipe.model.quantization) == ("lora", objective, "none")
    assert run(recipe) == 0
    version = mlflow.MlflowClient().get_model_version_by_alias(name, "challenger")
    assert (version.tags["finetune.method"], version.tags["finetune.objective"]) == ("dpo", objective)
    data = mlflow.get_run(version.run_id).data
    assert {"eval/tuned/pref_margin", "eval/start/pref_margin", "eval/tuned/pref_accuracy", "eval/n_pairs",
            "eval/tuned/rougeL", "train/loss", "train/rewards/margins"} <= set(data.metrics)
    assert f"{objective}.beta" in data.params
    assert {k.split(".")[0] for k in data.params} & {"dpo", "orpo", "simpo", "grpo"} == {objective}


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_reference_free_objectives_leave_out_pairs_without_room_for_an_answer(objective, tmp_path, capsys):
    """TRL's experimental trainers never cut a prompt: a pair whose prompt fills data.max_length would train
    on NaN, so it is left out with a warning (as DPO's trainer leaves it out), and an error says so when none
    fits."""
    rows = _rows(objective, 4) + [{**_rows(objective, 1, 9)[0],
                                   "prompt": [{"role": "user", "content": "word " * 80}]}]
    jsonl(tmp_path / "data" / "train.jsonl", rows)
    recipe = load_recipe(tmp_path, overrides={"objective": objective, "data.max_length": 64})
    data = load_splits(recipe)
    args = {**training_arguments(recipe, f"fit-{objective}", None), "save_strategy": "no"}
    module = objective_of(recipe)
    trainer = module.build_trainer(recipe, attach(load_base_model(recipe.model), recipe), load_tokenizer(),
                                   data.train, None, args, [])
    assert len(trainer.train_dataset) == 4
    assert ("1 of 5 train pairs have a prompt of data.max_length = 64 tokens or "
            "more") in capsys.readouterr().err
    recipe.data.max_length = 8
    with pytest.raises(FinetuneError, match="every prompt fills data.max_length"):
        module.build_trainer(recipe, attach(load_base_model(recipe.model), recipe), load_tokenizer(),
                             data.train, None, args, [])


def test_ia3_on_a_mixture_end_to_end(tmp_path, tracking_uri):
    """`-e ia3` with data.tasks: one IA3 adapter on the weighted mixture, per-task metrics."""
    root = tmp_path / "ia3mix"
    jsonl(root / "data" / "qa.jsonl", chat_rows(8))
    jsonl(root / "data" / "label.jsonl", [{"instruction": "Label it", "input": f"item {i}",
                                           "output": f"L{i % 3}"} for i in range(8)])
    (root / "finetune.yaml").write_text("data:\n  max_length: 64\n  eval_split: 0.25\n  tasks:\n"
                                        "    qa: {train: data/qa.jsonl, weight: 2}\n    label: {train: "
                                        "data/label.jsonl}\n")
    recipe = load_recipe(root, method="ia3", overrides=FAST)
    assert recipe.adapter.type == "ia3" and set(recipe.data.tasks) == {"qa", "label"}
    assert run(recipe) == 0
    version = mlflow.MlflowClient().get_model_version_by_alias("ia3mix", "challenger")
    metrics = mlflow.get_run(version.run_id).data.metrics
    assert {"eval/qa/rougeL", "eval/label/rougeL", "eval/tuned/rougeL"} <= set(metrics)
    assert version.tags["finetune.adapter"] == "ia3" and version.tags["finetune.tasks"] == "qa:2,label:1"


def test_an_adapter_continues_from_a_registered_version(tmp_path, tracking_uri):
    """model.init_adapter works for any objective: SFT on top of a registered LoRA version keeps its
    weights."""
    first = load_recipe(_project(tmp_path / "base-sft", "sft"), overrides=FAST)
    assert run(first) == 0
    again = load_recipe(tmp_path / "base-sft", overrides={
        **FAST, "model.init_adapter": "models:/base-sft@challenger", "registry.name": "continued"})
    assert run(again) == 0
    client = mlflow.MlflowClient()
    v1, v2 = (client.get_model_version_by_alias(n, "challenger") for n in ("base-sft", "continued"))
    assert v2.tags["finetune.base_model"] == v1.tags["finetune.base_model"]
    assert adapter_of(again).ARTIFACT == "adapter"
