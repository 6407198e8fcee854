"""KTO: preference tuning on unpaired thumbs-up/down answers (prompt, completion, label) with TRL's
KTOTrainer.

Where DPO needs two answers to one prompt and a verdict between them, KTO takes each answer on its own,
labelled desirable or not: every playground vote counts, ties and "both are bad" included (`votes export
--format kto`). Preference pairs (the dpo recipe's data) are unpaired first, as TRL does: the chosen answer
desirable, the rejected one not.
The reference model is the base (the adapter disabled), as for DPO; TRL estimates KTO's KL term from the other
answers of the batch, so `train.batch_size` is at least 2 (`config/checks.py`).

Evaluation: the usual one (base, few-shot and tuned answers scored against the desirable answers), then, on
every held-out prompt with both a desirable and an undesirable answer, how much more likely the starting and
the tuned policy make the desirable one: `eval/<policy>/pref_margin` and `pref_accuracy`, the numbers DPO
logs, so the two objectives compare on the same votes.

Rows with images go TRL's vision way, as for DPO (`dpo.py`): the processor as the processing class, TRL's
`DataCollatorForVisionUnpairedPreference` on each batch, the images read as batches are drawn
(`data/image_rows.py`).
"""

from __future__ import annotations

import sys

from mlflow_finetune_plugin.data.images import has_images
from mlflow_finetune_plugin.tracking import log_results
from mlflow_finetune_plugin.train.reach import aux_loss_arguments


def check(recipe) -> list[str]:
    return []


def build_trainer(recipe, model, tokenizer, train_ds, eval_ds, args: dict, callbacks: list):
    """TRL's KTOTrainer; with a fresh adapter the reference is the base (TRL disables the adapter)."""
    from trl import KTOConfig, KTOTrainer

    from mlflow_finetune_plugin.train.callbacks import DropReferenceAdapter

    # KTO walks its rows in order (TRL's `train_sampling_strategy: sequential`: each row's KL completion is
    # its neighbour's), and unpaired pairs come all desirable, then all undesirable: one seeded shuffle mixes
    # the labels within each batch, in an order that stays fixed.
    train_ds = unpaired(train_ds).shuffle(seed=recipe.train.seed)
    eval_ds = None if eval_ds is None else unpaired(eval_ds)
    cfg = recipe.kto
    config = KTOConfig(**args, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                       undesirable_weight=cfg.undesirable_weight, max_length=recipe.data.max_length,
                       **aux_loss_arguments(recipe, model, KTOConfig))
    processing_class = tokenizer
    if has_images(train_ds):
        processing_class, train_ds, eval_ds = _with_images(recipe, tokenizer, train_ds, eval_ds)
    return KTOTrainer(model=model, ref_model=None, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=processing_class, callbacks=[*callbacks, DropReferenceAdapter()])


def _with_images(recipe, tokenizer, train_ds, eval_ds):
    """(the processor, train and eval rows with their images read per batch and every row checked once), as
    `dpo._with_images`, with TRL's unpaired vision collator."""
    from mlflow_finetune_plugin.data.image_rows import checked_preference_rows, preference_collator
    from mlflow_finetune_plugin.models.vision import processor_for_images

    processor = processor_for_images(tokenizer, recipe.model.name)
    collator = preference_collator(processor, "unpaired_preference")
    return processor, *checked_preference_rows(collator, recipe.data.max_length, train_ds, eval_ds)


def evaluate(recipe, model, tokenizer, train_ds, eval_ds, base_model=None) -> None:
    """Answers scored against the desirable answers, then desirable-over-undesirable margins (see the
    docstring)."""
    from mlflow_finetune_plugin.evaluate.preferences import (
        preference_margins,
        preference_metrics,
        preference_table,
    )
    from mlflow_finetune_plugin.train.objectives import sft
    from mlflow_finetune_plugin.train.objectives.dpo import _starting_policy

    eval_ds = unpaired(eval_ds)
    desirable = eval_ds.filter(lambda row: row["label"])
    if len(desirable):
        sft.evaluate(recipe, model, tokenizer, unpaired(train_ds).filter(lambda row: row["label"]), desirable,
                     base_model)
    pairs = unpaired_to_pairs(eval_ds)
    if not pairs:
        print(
            "KTO evaluation: no held-out prompt has both a desirable and an undesirable answer; no margins.",
            file=sys.stderr)
        return

    def margins(policy):
        return preference_margins(policy, tokenizer, pairs, recipe.data.max_length, recipe.train.batch_size)

    if base_model is not None:
        start = margins(base_model)
    else:
        with _starting_policy(model, recipe.model.init_adapter):
            start = margins(model)
    tuned = margins(model)
    if not tuned:
        return
    metrics = {**preference_metrics(start, "start"), **preference_metrics(tuned, "tuned")}
    log_results({**metrics, "eval/n_pairs": float(len(tuned))})
    print(f"\nHeld-out desirable/undesirable pairs ({len(tuned)}): log p(desirable) - log p(undesirable)")
    print(preference_table(metrics))


def unpaired(ds):
    """Unpaired rows as they are; preference pairs (`-e kto` on the dpo recipe) as two rows each, the chosen
    answer desirable and the rejected one not (TRL's `unpair_preference_dataset`)."""
    from trl.data_utils import unpair_preference_dataset

    return unpair_preference_dataset(ds) if "chosen" in ds.column_names else ds


def unpaired_to_pairs(rows) -> list[dict]:
    """prompt/chosen/rejected pairs from unpaired rows: for each prompt (with its images: one question asked
    of different images is as many prompts), every desirable answer against every undesirable one (TRL's
    `unpair_preference_dataset`, backwards)."""
    import json

    from mlflow_finetune_plugin.data.image_rows import IMAGES

    by_prompt: dict[str, dict] = {}
    for row in rows:
        images = {IMAGES: row[IMAGES]} if IMAGES in row else {}
        entry = by_prompt.setdefault(json.dumps([row["prompt"], images], sort_keys=True),
                                     {"prompt": row["prompt"], "images": images, True: [], False: []})
        entry[bool(row["label"])].append(row["completion"])
    return [{"prompt": e["prompt"], "chosen": good, "rejected": bad, **e["images"]}
            for e in by_prompt.values() for good in e[True] for bad in e[False]]
