"""The model card: every registered version carries one, built from its run, as README.md in the logged
model's artifacts and as the version's description (what the MLflow UI shows on the version's page)."""

from __future__ import annotations

from pathlib import Path

import mlflow

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.config.loading import load_recipe, to_yaml
from mlflow_finetune_plugin.registry import model_card
from mlflow_finetune_plugin.train.job import run
from tests.helpers import FAST_OVERRIDES, chat_rows, jsonl

SYSTEM = "You are a careful calculator. Answer with the sum."


def test_a_registered_version_has_its_card_in_the_artifacts_and_as_description(tmp_path, tracking_uri):
    root = tmp_path / "adder"
    jsonl(root / "data" / "train.jsonl", chat_rows(8))
    jsonl(root / "data" / "eval.jsonl", chat_rows(2, 50))
    (root
     / "finetune.yaml").write_text(f"data: {{train: data/train.jsonl, eval: data/eval.jsonl, max_length: 64, "
                                   f"system_prompt: '{SYSTEM}'}}\nadapter: {{type: lora, r: 4}}\n"
                                   "eval: {min_gain: 0.1}\n")
    recipe = load_recipe(root, overrides=FAST_OVERRIDES)
    assert run(recipe) == 0

    client = mlflow.MlflowClient()
    version = client.get_model_version("adder", "1")
    card = (Path(mlflow.artifacts.download_artifacts("models:/adder/1")) / "README.md").read_text()
    assert version.description == model_card.description(card)
    assert card.startswith("# adder\n")
    training_run = client.get_run(version.run_id)
    metrics = training_run.data.metrics

    # Base model and method.
    assert "`builtin:tiny-llama`" in card and "`-e lora`" in card and "lora (r=4, alpha=32" in card
    assert "| Objective | sft |" in card and "| Quantization of the base | none |" in card
    # The data the run logged as its inputs: name, rows, digest.
    inputs = {i.dataset.name: i.dataset for i in training_run.inputs.dataset_inputs}
    assert f"| training | train | 8 | `{inputs['train'].digest}` |" in card
    assert f"| eval | eval | 2 | `{inputs['eval'].digest}` |" in card
    # The evaluation table holds the numbers the run logged, for each contender.
    for contender in ("base", "fewshot", "retrieval", "tuned"):
        for metric in ("loss", "perplexity", "rougeL", "token_f1"):
            value = metrics[f"eval/{contender}/{metric}"]
            assert f"{value:.4f}" in card, (contender, metric)
    table = card.split("```\n", 2)[1]
    assert table.splitlines()[0].split() == ["metric", "base", "fewshot", "retrieval", "tuned"]
    # The verdict: 2 steps of a random-weight model on 2 held-out rows is never a pay-off; the card says so.
    run_tags = training_run.data.tags
    assert run_tags[tags.VERDICT_PAID_OFF] == "false"
    assert run_tags[tags.VERDICT_BEST_ALTERNATIVE] in ("base", "fewshot", "retrieval")
    sentence = run_tags[tags.VERDICT]
    assert sentence.startswith("fine-tuning did not pay off: rougeL ") and "too few to tell" in sentence
    assert f"general-text perplexity x{metrics['eval/forgetting/ppl_ratio']:.2f}" in sentence
    verdict = card.split("## Verdict\n\n", 1)[1].split("\n\n## ", 1)[0]
    assert sentence[1:] in verdict and f"`{run_tags[tags.VERDICT_BEST_ALTERNATIVE]}`" in verdict
    assert f"{metrics['eval/verdict/margin_low']:+.4f}" in verdict
    # The recipe's least gain that matters is the one weighed, logged and said.
    assert metrics["eval/verdict/min_gain"] == 0.1 and ("the margin is at least 0.1 "
                                                        "(`eval.min_gain`)") in verdict
    assert run_tags[tags.VERDICT_DEPLOY] == "none"  # too few examples to recommend anything
    assert "runtime" not in table  # the trainer's timings are not results
    # Forgetting figures, and what the model is for.
    for key in ("base_loss", "tuned_loss", "base_ppl", "tuned_ppl"):
        assert f"{metrics['eval/forgetting/' + key]:.4f}" in card
    assert f"**{metrics['eval/forgetting/ppl_ratio']:.3f}**" in card
    use = card.split("## Intended use", 1)[1]
    assert f'"{SYSTEM}"' in use and "on 8 rows of `train`" in use
    assert "small data: 8 training rows" in use and "evaluated only on the held-out split (2 examples" in use
    assert "random-weight test model" in use
    # The resolved recipe, as the run logged it.
    assert f"```yaml\n{to_yaml(recipe).rstrip()}\n```" in card


def test_a_card_too_long_for_the_registry_leaves_the_recipe_out_of_the_description():
    head = "# bot\n\n## Evaluation\n\n" + "x" * 3000
    card = f"{head}\n\n{model_card.RECIPE_HEADING}\n\n```yaml\n" + "key: value\n" * 400 + "```\n"
    short = model_card.description(card)
    assert len(card) > model_card.MAX_DESCRIPTION >= len(short)
    assert short.startswith(head) and model_card.RECIPE_HEADING not in short and "README.md" in short
    huge = model_card.description("y" * 9000)
    assert len(huge) <= model_card.MAX_DESCRIPTION and huge.endswith("artifacts.)\n")
    assert model_card.description("# small\n") == "# small\n"
