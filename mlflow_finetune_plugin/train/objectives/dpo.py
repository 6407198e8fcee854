"""DPO: preference tuning on (prompt, chosen, rejected) pairs with TRL's DPOTrainer, on any adapter.

A fresh adapter's reference model is the base (the adapter disabled); continuing an adapter
(`model.init_adapter: models:/support-bot@champion`, e.g. the SFT version being improved) keeps training it,
and a frozen copy of it is the reference, as TRL does for a pretrained adapter. Evaluation adds, to the
answers scored against the chosen ones, how much more likely the starting and the tuned policy make the chosen
answer than the rejected one on the held-out pairs (`evaluate/preferences.py`). The reference-free objectives
(`orpo`, `simpo`) evaluate the same way.

Rows with images (a vision-language model) go TRL's vision way: the processor is the trainer's processing
class, TRL's `DataCollatorForVisionPreference` renders and processes each batch as it is drawn, and the rows'
images are read then (`data/image_rows.py`); the held-out pairs are scored through the same collator.
"""

from __future__ import annotations

import contextlib
import sys

from mlflow_finetune_plugin.data.images import has_images
from mlflow_finetune_plugin.models.peft_targets import keep_module_targets
from mlflow_finetune_plugin.tracking import log_results
from mlflow_finetune_plugin.train.adapters import resolve_adapter
from mlflow_finetune_plugin.train.reach import aux_loss_arguments


def check(recipe) -> list[str]:
    return []


def build_trainer(recipe, model, tokenizer, train_ds, eval_ds, args: dict, callbacks: list):
    """TRL's DPOTrainer; the reference is the base (fresh adapter) or a frozen copy of `init_adapter`."""
    from trl import DPOConfig, DPOTrainer

    from mlflow_finetune_plugin.train.callbacks import DropReferenceAdapter

    cfg = recipe.dpo
    config = DPOConfig(**args, beta=cfg.beta, loss_type=[cfg.loss_type], label_smoothing=cfg.label_smoothing,
                       max_length=recipe.data.max_length, **aux_loss_arguments(recipe, model, DPOConfig))
    processing_class = tokenizer
    if has_images(train_ds):
        processing_class, train_ds, eval_ds = _with_images(recipe, tokenizer, train_ds, eval_ds)
    return DPOTrainer(model=model, ref_model=None, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=processing_class,
                      callbacks=[*callbacks, DropReferenceAdapter()])


def _with_images(recipe, tokenizer, train_ds, eval_ds):
    """(the processor, train and eval rows with their images read per batch and every row checked once): TRL
    takes the processor as the processing class, sees the `images` column and collates with its vision
    collator."""
    from mlflow_finetune_plugin.data.image_rows import checked_preference_rows, preference_collator
    from mlflow_finetune_plugin.models.vision import processor_for_images

    processor = processor_for_images(tokenizer, recipe.model.name)
    collator = preference_collator(processor, "preference")
    return processor, *checked_preference_rows(collator, recipe.data.max_length, train_ds, eval_ds)


def evaluate(recipe, model, tokenizer, train_ds, eval_ds, base_model=None) -> None:
    """The usual evaluation (base, few-shot and tuned answers against the chosen ones), then the
    chosen-over-rejected log-prob margin and accuracy of the starting and the tuned policy on every held-out
    pair."""

    from mlflow_finetune_plugin.data.image_rows import IMAGES
    from mlflow_finetune_plugin.evaluate.preferences import (
        preference_margins,
        preference_metrics,
        preference_table,
    )
    from mlflow_finetune_plugin.train.objectives import sft

    sft.evaluate(recipe, model, tokenizer, train_ds, eval_ds, base_model)

    pairs = [{k: row[k] for k in ("prompt", "chosen", "rejected", IMAGES) if k in row} for row in eval_ds]

    def margins():  # batches of train.batch_size pairs, as TRL's own evaluation runs them
        return preference_margins(model, tokenizer, pairs, recipe.data.max_length, recipe.train.batch_size)

    if base_model is not None:  # a full fine-tune started from the base loaded apart
        start = preference_margins(base_model, tokenizer, pairs, recipe.data.max_length,
                                   recipe.train.batch_size)
    else:
        with _starting_policy(model, recipe.model.init_adapter):
            start = margins()
    tuned = margins()
    if not tuned:
        print("Preference evaluation: no held-out pair fits data.max_length; nothing scored.",
              file=sys.stderr)
        return
    metrics = {**preference_metrics(start, "start"), **preference_metrics(tuned, "tuned")}
    log_results({**metrics, "eval/n_pairs": float(len(tuned))})
    print(f"\nHeld-out preference pairs ({len(tuned)}): log p(chosen) - log p(rejected)")
    print(preference_table(metrics))


@contextlib.contextmanager
def _starting_policy(model, init_adapter: str | None):
    """The policy training started from: the base (a fresh adapter disabled), or the `init_adapter` weights
    loaded again beside the tuned adapter (DPO's frozen `ref` copy of them is deleted when training ends,
    before evaluation; ORPO and SimPO keep none)."""
    if not init_adapter:
        with model.disable_adapter():
            yield
        return
    tuned = model.active_adapter
    keep_module_targets()  # a mixture of experts' adapter loads as it was saved (models/peft_targets.py)
    model.load_adapter(str(resolve_adapter(init_adapter)), adapter_name="start")
    model.set_adapter("start", inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(tuned)
        model.delete_adapter("start")
