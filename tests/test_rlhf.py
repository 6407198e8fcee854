"""RLHF from votes on the tiny model: a reward model (`-e reward`, TRL's RewardTrainer) trained, registered,
evaluated and reloaded as a pyfunc scorer; GRPO naming it in `grpo.rewards`; KTO (`-e kto`) on unpaired
thumbs-up/down rows; `votes export --format kto`; and the refusals before any run exists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.arena.votes import Comparison, export, log_vote
from mlflow_finetune_plugin.backend import resolve_entry_point
from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.data.check import check_data
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.registry.promotion import promote
from mlflow_finetune_plugin.train.job import run
from tests.helpers import FAST_OVERRIDES, jsonl, subprocess_env


def _pairs(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "chosen": f"{i} plus {i} is {2 * i}.",
             "rejected": "No idea."} for i in range(offset, offset + n)]


def _reward_project(root: Path) -> Path:
    jsonl(root / "data" / "train.jsonl", _pairs(8))
    jsonl(root / "data" / "eval.jsonl", _pairs(4, 50))
    (root
     / "finetune.yaml").write_text("data: {train: data/train.jsonl, eval: data/eval.jsonl, max_length: 64}\n"
                                   "registry: {name: bot}\n")
    return root


def test_votes_to_reward_model_to_grpo(tmp_path, tracking_uri):
    """`mlflow run DIR -e reward --backend finetune`: a FINISHED run, a version of `<name>-rm` that scores
    pairs, evaluated against the base's log-prob margin and the longer answer; then GRPO with it as a reward,
    and the refusals of a version that is not a reward model (GRPO) and of a reward model given to serving."""
    project = _reward_project(tmp_path / "rm")
    cmd = [sys.executable, "-m", "mlflow", "run", str(project), "-e", "reward", "--backend", "finetune",
           "--experiment-name", "rlhf", *(a for k, v in {**FAST_OVERRIDES, "model": "tiny"}.items()
                                         for a in ("-P", f"{k}={v}"))]
    done = subprocess.run(cmd, env=subprocess_env(tracking_uri), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("bot-rm", "challenger")
    assert version.tags[tags.OBJECTIVE] == "reward" and version.tags[tags.VLLM_COMPATIBLE] == "false"
    training = client.get_run(version.run_id)
    assert training.info.status == "FINISHED"
    metrics = training.data.metrics
    assert {"eval/tuned/pair_accuracy", "eval/base/pair_accuracy", "eval/length/pair_accuracy",
            "eval/n_pairs", "train/loss"} <= set(metrics)
    assert metrics["eval/length/pair_accuracy"] == 1.0  # every chosen answer is the longer one
    assert metrics["eval/n_pairs"] == FAST_OVERRIDES["eval.max_examples"]  # 4 held out, the first N scored
    assert "pair_accuracy" in training.data.tags[tags.VERDICT]
    # The recorded default gate is the one a reward model can pass: pair accuracy over the base's margin and
    # the longer answer (no rougeL, no forgetting), so `promote` checks it instead of refusing for missing
    # metrics.
    checked = promote("bot-rm", "1")
    assert [(c.metric, c.against) for c in checked.checks] == [
        ("pair_accuracy", "base"), ("pair_accuracy", "length"), ("pair_accuracy", "champion")]
    assert checked.checks[1].other == 1.0 and checked.checks[2].passed  # no champion yet
    assert checked.promoted == checked.passed

    scorer = mlflow.pyfunc.load_model("models:/bot-rm/1")
    scores = scorer.predict(pd.DataFrame({"prompt": ["What is 1 plus 1?", "What is 1 plus 1?"],
                                          "answer": ["1 plus 1 is 2.", "No idea."]}))
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores) and scores[0] != scores[1]

    # GRPO on the prompts of the same pairs (their chosen answers the references), the reward model as a
    # reward.
    grpo = load_recipe(project, method="grpo", overrides={
        **FAST_OVERRIDES, "registry.name": "policy", "grpo.num_generations": 2,
        "grpo.max_completion_length": 8, "grpo.rewards": '["models:/bot-rm/1", "exact_answer"]'})
    assert run(grpo) == 0
    policy = client.get_model_version_by_alias("policy", "challenger")
    logged = client.get_run(policy.run_id).data.metrics
    assert "train/rewards/bot-rm_1/mean" in logged
    assert {"eval/tuned/reward_bot-rm_1", "eval/base/reward_bot-rm_1", "eval/tuned/answer_tokens",
            "eval/base/answer_tokens", "eval/tuned/rougeL", "eval/base/rougeL"} <= set(logged)
    assert logged["eval/tuned/kl_to_base"] >= 0  # the reward-hacking check beside the rewards

    with pytest.raises(FinetuneError, match="is not a reward model: it was trained with objective grpo"):
        resolve_entry_point(str(project), "grpo", {"grpo.rewards": '["models:/policy/1"]',
                                                   "grpo.max_completion_length": 8})
    from mlflow_finetune_plugin.serving.base import ModelChoice
    from mlflow_finetune_plugin.serving.choices import local_model

    with pytest.raises(FinetuneError, match="is a reward model and cannot be served"):
        local_model(ModelChoice("bot-rm", "1"))


def test_kl_to_base_is_zero_for_an_untouched_adapter_and_grows_with_the_update(tiny_model_dir):
    """TRL's GRPO `kl` (k3, per answer token) of the tuned policy's answers against the adapter switched
    off."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlflow_finetune_plugin.evaluate.policy_kl import answer_kl

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    prompts = [[{"role": "user", "content": "What is 1 plus 1?"}], "Say hi."]
    answers = ["1 plus 1 is 2.", "Hello there, friend."]
    kl, per_answer = answer_kl(model, tokenizer, prompts, answers, batch_size=1)
    assert kl == 0.0 and per_answer == [0.0, 0.0]  # LoRA's B starts at zero: the same model as the base
    torch.manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5)
    kl, per_answer = answer_kl(model, tokenizer, prompts, answers, batch_size=2)
    assert kl > 0 and all(v > 0 for v in per_answer)
    assert min(per_answer) <= kl <= max(per_answer)  # the token-weighted mean of the answers' means


def test_reward_refuses_prefix_tuning_before_a_run(tmp_path):
    project = _reward_project(tmp_path / "rm")
    with pytest.raises(FinetuneError, match="prefix cannot train a reward model"):
        resolve_entry_point(str(project), "reward", {"adapter.type": "prefix"})
    assert load_recipe(project, method="reward").registry.name == "bot-rm"
    assert load_recipe(project, method="reward", overrides={"registry.name": "mine"}).registry.name == "mine"


def test_reward_gates_default_to_pair_accuracy(tmp_path, capsys):
    """A reward run gates on what it logs: written gates for the recipe's chat models (rougeL, forgetting)
    give way with a note; gates naming pair_accuracy, or given with -P, stay; other objectives keep theirs."""
    project = _reward_project(tmp_path / "rm")
    (project / "finetune.yaml").write_text(
        "data: {train: data/train.jsonl, eval: data/eval.jsonl, max_length: 64}\n"
        "registry: {name: bot, promote_if: [{metric: rougeL}, {metric: forgetting/ppl_ratio, at_most: "
        "1.5}]}\n")
    gates = load_recipe(project, method="reward").registry.promote_if
    assert [(g.metric, g.beats) for g in gates] == [("pair_accuracy", ["base", "length", "champion"])]
    assert "names no metric a reward model logs" in capsys.readouterr().err
    assert [g.metric for g in load_recipe(project, method="dpo").registry.promote_if] == [
        "rougeL",
        "forgetting/ppl_ratio",
    ]
    given = load_recipe(project, method="reward",
                        overrides={"registry.promote_if": '[{"metric": "pair_accuracy", "margin": 0.05}]'})
    assert [(g.metric, g.margin) for g in given.registry.promote_if] == [("pair_accuracy", 0.05)]


def test_kto_trains_on_thumbs_and_is_evaluated_like_dpo(tmp_path, tracking_uri):
    rows = [r for i in range(6) for r in (
        {"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}", "label": True},
        {"prompt": f"What is {i} plus {i}?", "completion": "No idea.", "label": False})]
    jsonl(tmp_path / "thumbs" / "data" / "train.jsonl", rows[:8])
    jsonl(tmp_path / "thumbs" / "data" / "eval.jsonl", rows[8:])
    (tmp_path / "thumbs"
     / "finetune.yaml").write_text("data: {train: data/train.jsonl, eval: data/eval.jsonl, "
                                   "max_length: 64}\n")
    recipe, _ = resolve_entry_point(str(tmp_path / "thumbs"), "kto", FAST_OVERRIDES)
    assert (recipe.objective, recipe.adapter.type) == ("kto", "lora")
    assert run(recipe) == 0
    version = mlflow.MlflowClient().get_model_version_by_alias("thumbs", "challenger")
    metrics = mlflow.get_run(version.run_id).data.metrics
    assert {"eval/start/pref_accuracy", "eval/tuned/pref_accuracy", "eval/tuned/rougeL",
            "train/loss"} <= set(metrics)
    with pytest.raises(FinetuneError, match="train.batch_size \\(1\\) must be 2 or more with objective: kto"):
        resolve_entry_point(str(tmp_path / "thumbs"), "kto", {"train.batch_size": 1})


def test_a_thumbs_file_is_checked_by_line(tmp_path):
    path = tmp_path / "thumbs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Hi", "completion": "Hello!", "label": True},
        {"prompt": "Hi", "completion": "Go away.", "label": "no"},
        {"prompt": "Hi", "completion": "Hello!", "label": False},
        {"prompt": "Hi", "completion": "", "label": False},
        {"prompt": "Hi", "completion": "Hello!", "label": True}]) + "\n")
    report = check_data(path, fmt="unpaired_preference")
    assert report.format == "unpaired_preference"
    errors = [str(i) for i in report.errors]
    assert f"{path}:2: 'label' must be true (desirable) or false (undesirable), got a string 'no'" in errors
    assert any(e.startswith(f"{path}:4: ") and "'completion' is empty" in e for e in errors)
    warnings = [str(i) for i in report.warnings]
    assert f"{path}:5: duplicate of line 1 (identical row)" in warnings
    assert any(w.startswith(f"{path}:1: the same answer is labelled desirable") for w in warnings)
    assert check_data(path).format == "unpaired_preference"  # detected, not read as prompt_completion


def test_votes_export_kto_labels_every_verdict(tmp_path, tracking_uri):
    def vote(prompt, a, b, verdict):
        context = [{"role": "user", "content": prompt}]
        log_vote(Comparison("bot", "bot/2", "bot/1", context, context, a, b, {}), verdict)

    vote("p1", "good", "bad", "a")
    vote("p2", "bad", "good", "b")
    vote("p3", "fine", "also fine", "tie")
    vote("p4", "awful", "worse", "both_bad")
    result = export("bot", tmp_path / "kto.jsonl", fmt="kto")
    rows = [json.loads(line) for line in (tmp_path / "kto.jsonl").read_text().splitlines()]
    labels = {(r["prompt"][-1]["content"], r["completion"][0]["content"]): r["label"] for r in rows}
    assert labels == {("p1", "good"): True, ("p1", "bad"): False, ("p2", "good"): True, ("p2", "bad"): False,
                      ("p3", "fine"): True, ("p3", "also fine"): True, ("p4", "awful"): False,
                      ("p4", "worse"): False}
    assert result.written == 8 and check_data(tmp_path / "kto.jsonl").ok
    pairs = export("bot", tmp_path / "pairs.jsonl")
    assert pairs.written == 2 and pairs.skipped == {"ties or both-bad votes (no preference)": 2}
    from click.testing import CliRunner

    from mlflow_finetune_plugin.cli import main

    cli = CliRunner().invoke(main, ["votes", "export", "bot", "--format", "kto", "-o",
                                    str(tmp_path / "cli.jsonl")])
    assert cli.exit_code == 0 and "Wrote 8 thumbs-up/down rows" in cli.output, cli.output
