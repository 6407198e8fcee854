"""`-e optimize-prompt`: the light-touch method as a run of its own. No weight changes: the base model, the
data's prompt-only contenders (zero-shot, few-shot, retrieval) and the optimized prompt
(`evaluate/prompt_search.py`) are scored on the held-out rows, and the winning prompt is registered as
`<registry.name>-prompt` (alias `candidate`, `champion` through the gates), so it sits in the registry beside
the fine-tunes of the same data."""

from __future__ import annotations

import mlflow

from mlflow_finetune_plugin import stops
from mlflow_finetune_plugin import tags as tag
from mlflow_finetune_plugin.data import splits
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.logged_model import chat_template_hash
from mlflow_finetune_plugin.models.base import load_base_model, load_tokenizer, model_reference
from mlflow_finetune_plugin.models.template_clock import pinned_clock
from mlflow_finetune_plugin.train import publish, templates


def optimize_prompt(recipe, run_id: str, main: bool = True) -> None:
    """The run of `-e optimize-prompt` (see the module's note); one process: nothing is distributed."""
    from mlflow_finetune_plugin.evaluate.contenders import conversations, run_evaluation
    from mlflow_finetune_plugin.evaluate.proposer import proposer_of
    from mlflow_finetune_plugin.evaluate.report import log_evaluation
    from mlflow_finetune_plugin.metrics import OPTIMIZED, comparison_table

    if not main:
        return
    with pinned_clock():
        base_ref = model_reference(recipe.model.name)
        tags = publish.log_recipe(recipe, run_id, base_ref, (False, "no weights trained: a prompt"))
        data = splits.load_splits(recipe)
        if data.eval is None:
            raise FinetuneError("-e optimize-prompt scores the prompts on held-out rows: give data.eval or "
                                "data.eval_split")
        tags.update(splits.log_inputs(recipe, data))
        mlflow.set_tags(tags)
        tokenizer = load_tokenizer(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code,
                                   recipe.model.chat_template, recipe.project_dir)
        data = templates.for_template(recipe, data, tokenizer, main)
        # What `serve --prompt` matches a version's base side on (registry/prompts.version_on_base)
        mlflow.set_tag(tag.CHAT_TEMPLATE_HASH, chat_template_hash(tokenizer))
        model = load_base_model(recipe.model).eval()
        stops.enter("evaluate")
        result = run_evaluation(model, tokenizer, conversations(data.eval), conversations(data.train),
                                recipe.eval, base_model=model, proposer=proposer_of(recipe.eval,
                                                                                    recipe.distill),
                                tuned=False)
        log_evaluation(result)
        print(comparison_table(result.metrics))
        if OPTIMIZED not in result.contenders:
            raise FinetuneError(
                f"-e optimize-prompt: the prompt search did not run: {result.notes.get(OPTIMIZED)}")
        stops.enter("publish")
        if recipe.registry.enabled:
            publish.publish_prompt(recipe, recipe.registry.name, base_ref)
        metric = recipe.eval.optimize.metric
        best = max(result.contenders, key=lambda c: result.metrics.get(f"eval/{c}/{metric}", 0.0))
        print(f"\nPrompt search: {result.search.reason}; on the held-out rows the best by {metric} is "
              f"{best}.")
