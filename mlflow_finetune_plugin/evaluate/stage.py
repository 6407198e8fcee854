"""The evaluation stage of a fine-tune, its one door: what is evaluated (a documents recipe's four contenders,
a mixture's tasks, or the objective's own evaluation of one set), the forgetting check, and which verdict
weighs it. The pipeline calls it after training and the rehearsal before training, on two rows; a new kind of
evaluation is added here.

Plain data in: the recipe, the model and tokenizer, the run's splits, the base contender (None when the
adapter switched off is the base), and for a documents recipe what `train/documents.py` prepared (its held-out
sets and retriever). The objective comes in as the value it is (its module, with its `evaluate`)."""

from __future__ import annotations

from mlflow_finetune_plugin.config.checks import SCORING


def has_held_out(data, prepared=None) -> bool:
    """Whether there is anything to evaluate: a documents recipe's sets, a mixture's held-out rows or one
    set's."""
    return prepared is not None or bool(data.task_evals if data.is_mixture else data.eval is not None)


def evaluate(recipe, objective, model, tokenizer, data, base=None, prepared=None) -> dict | None:
    """Score the tuned model against its contenders and log the results into the active run. Returns a
    documents recipe's per-example scores (what its verdict weighs; None for the others, whose verdict reads
    the logged scores)."""
    if prepared is not None:  # zero-shot, RAG, tuned, tuned + RAG on known and unseen documents
        return _documents(recipe, model, tokenizer, prepared, base)
    if data.is_mixture:  # mixtures train with sft only
        from mlflow_finetune_plugin.evaluate.mixture import evaluate_tasks

        evaluate_tasks(recipe, model, tokenizer, data.tasks, data.task_evals, base)
    else:
        objective.evaluate(recipe, model, tokenizer, data.train, data.eval, base)
    return None


def check_forgetting(recipe, general_text: list[str], model, tokenizer, base=None) -> bool:
    """The forgetting check on `eval.forgetting`'s general texts (base against tuned); whether it ran. A
    reward model writes no text to measure forgetting on."""
    from mlflow_finetune_plugin.evaluate import forgetting

    if not general_text or recipe.objective in SCORING:
        return False
    forgetting.check(recipe, general_text, model, tokenizer, base)
    return True


def conclude(run_id: str, recipe, scored: dict | None = None, documents: bool = False):
    """The verdict of the run (did fine-tuning pay off?), set as its tags and metrics and returned: a
    documents recipe's (`documents_verdict.py`, over `scored`) or every other run's (`verdict.py`, over its
    logged scores)."""
    if documents:
        from mlflow_finetune_plugin.evaluate.documents_verdict import conclude_documents

        return conclude_documents(run_id, scored or {}, recipe.retrieval.k, recipe.registry.promote_if,
                                  recipe.eval.min_gain)
    from mlflow_finetune_plugin.evaluate.verdict import conclude as conclude_run

    registered = recipe.registry.name if recipe.registry.enabled else None  # its optimized prompt's name
    return conclude_run(run_id, recipe.registry.promote_if, min_gain=recipe.eval.min_gain,
                        registered=registered)


def _documents(recipe, model, tokenizer, prepared, base) -> dict:
    """The documents recipe's four contenders on its two held-out sets; the per-example scores the verdict
    weighs."""
    from mlflow_finetune_plugin.data.document_rows import KNOWN, UNSEEN
    from mlflow_finetune_plugin.evaluate.documents import evaluate_documents
    from mlflow_finetune_plugin.evaluate.verdict import per_example_scores

    results = evaluate_documents(recipe.eval, model, tokenizer, {KNOWN: prepared.sets.known,
                                                                 UNSEEN: prepared.sets.unseen},
                                 prepared.retriever, base, served_with_retrieval=recipe.retrieval.raft)
    return {name: per_example_scores(result.rows) for name, result in results.items()}
