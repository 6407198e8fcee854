"""Supervised fine-tuning (SFT) with TRL's SFTTrainer: loss on the assistant's tokens of chat-formatted rows.

Packed rows stay rows unless a varlen flash-attention kernel is there to use the padding-free layout, and the
loss goes through TRL's fused LM head or the chunked one as `train.fused_lm_head` says (see `sft_trainer.py`).
"""

from __future__ import annotations

import sys

from mlflow_finetune_plugin.config.checks import NOT_PACKABLE
from mlflow_finetune_plugin.data.images import has_images
from mlflow_finetune_plugin.models import kernels
from mlflow_finetune_plugin.train.reach import aux_loss_arguments

FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn",
                   "kernels-community/flash-attn3", "kernels-community/vllm-flash-attn3")


def check(recipe) -> list[str]:
    return []


def build_trainer(recipe, model, tokenizer, train_ds, eval_ds, args: dict, callbacks: list):
    """TRL's SFTTrainer on chat data: loss on each assistant reply and its end-of-turn token (any chat
    template), and on every token of the replayed text (`data.replay`)."""
    from trl import SFTConfig

    from mlflow_finetune_plugin.data import replay
    from mlflow_finetune_plugin.data.loss_masks import trained_share, with_turn_weights
    from mlflow_finetune_plugin.train.objectives.sft_trainer import FinetuneSFTTrainer

    if has_images(train_ds):
        return _vision_trainer(recipe, model, tokenizer, train_ds, eval_ds, args, callbacks)
    texts = replay.read_replay(recipe)
    kl_rows = []
    # scored beside the training rows by the trainer, not among them
    if texts and recipe.data.replay_loss == "kl":
        kl_rows = replay.replay_pieces(tokenizer, texts, recipe.data.max_length, recipe.train.seed)
        every = recipe.data.replay_every
        when = "each training step" if every == 1 else f"one training step in {every}"
        print(f"Replay (data.replay, kl): {when} also pulls the model towards the base model on one of "
              f"{len(kl_rows)} rows of general text from {replay.replay_path(recipe).name} (weight "
              f"{recipe.data.replay_weight * every:g})")
        texts = []
    # Every row tokenized here with its loss mask (models/chat_format.py finds each assistant turn for any
    # chat template); TRL builds the labels from the masks.
    n_train = len(train_ds)
    assistant_only = recipe.data.assistant_only_loss
    train_ds, eval_ds = (with_turn_weights(tokenizer, ds, assistant_only) for ds in (train_ds, eval_ds))
    _tag_loss(assistant_only, trained_share(train_ds))
    if texts:
        rows = replay.replay_rows(tokenizer, texts, replay.replay_count(n_train, recipe.data.replay_share),
                                  recipe.data.max_length, recipe.train.seed)
        print(replay.describe(n_train, rows, train_ds, replay.replay_path(recipe)))
        train_ds = replay.with_replay(train_ds, rows, recipe.train.seed)
    pack = packing(recipe, tokenizer, train_ds, model.config)
    config = SFTConfig(**args, max_length=recipe.data.max_length, packing=pack,
                       **aux_loss_arguments(recipe, model, SFTConfig))
    head = fused_lm_head(recipe, model.config)
    teacher = _logits_teacher(recipe, model)
    if teacher is not None:
        head = False  # the KL term needs the student's logits of the answer tokens: the model's own loss path
    # before TRL wraps the model's forward for its own fused head (which then stays unused)
    if head == "liger":
        kernels.lm_head(model)
    return FinetuneSFTTrainer(
        model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        callbacks=callbacks, fused_lm_head=head, pack_rows=pack and not _varlen_attention(recipe),
        teacher=teacher, teacher_weight=recipe.distill.kl_weight if teacher is not None else 0.0,
        replay_kl=kl_rows, replay_weight=recipe.data.replay_weight, replay_every=recipe.data.replay_every)


def _vision_trainer(recipe, model, tokenizer, train_ds, eval_ds, args: dict, callbacks: list):
    """SFT on rows with images: each batch processed as it is drawn (`data/image_rows.py`: the processor's
    inputs, labels on the assistant's tokens only), never packed, the loss through the model's own head."""
    from trl import SFTConfig

    from mlflow_finetune_plugin.data.image_rows import VisionCollator
    from mlflow_finetune_plugin.models.vision import processor_for_images
    from mlflow_finetune_plugin.train.objectives.sft_trainer import FinetuneSFTTrainer

    if recipe.data.packing is True:
        print("data.packing: rows with images are not packed (each image's tokens belong to its own row)")
    _tag_packing("unpacked (rows with images)")
    processor = processor_for_images(tokenizer, recipe.model.name)
    collator = VisionCollator(processor, tokenizer, recipe.data.assistant_only_loss, recipe.data.max_length)
    # Every row through the processor once before the first step: a row too long with its image tokens, or an
    # image the processor cannot take, fails here with its row number, not mid-training.
    _tag_loss(recipe.data.assistant_only_loss, collator.check(train_ds, "data.train"))
    if eval_ds is not None:
        collator.check(eval_ds, "data.eval")
    if note := collator.sizes.note():
        print(note)
    config = SFTConfig(**{**args, "remove_unused_columns": False}, max_length=recipe.data.max_length,
                       packing=False, dataset_kwargs={"skip_prepare_dataset": True},
                       **aux_loss_arguments(recipe, model, SFTConfig))
    return FinetuneSFTTrainer(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                              processing_class=processor, data_collator=collator, callbacks=callbacks,
                              fused_lm_head=False)


def _logits_teacher(recipe, model):
    """`distill.loss: logits`: the registered teacher, frozen beside the student (its tokenizer was checked to
    be the student's before the student loaded, `distill/answers.py`); None otherwise."""
    distill = recipe.distill
    if distill is None or not distill.teacher or distill.loss != "logits":
        return None
    from mlflow_finetune_plugin.distill.teacher import teacher_model

    return teacher_model(distill.teacher, model.device)


def evaluate(recipe, model, tokenizer, train_ds, eval_ds, base_model=None) -> None:
    """Base zero-shot, base few-shot and tuned on the held-out rows; metrics, table and chart go to the
    run."""
    from mlflow_finetune_plugin.data.teacher import teachers
    from mlflow_finetune_plugin.evaluate.contenders import conversations, run_evaluation
    from mlflow_finetune_plugin.evaluate.proposer import proposer_of
    from mlflow_finetune_plugin.evaluate.report import log_evaluation, misrouted_note
    from mlflow_finetune_plugin.metrics import comparison_table

    result = run_evaluation(model, tokenizer, conversations(eval_ds), conversations(train_ds), recipe.eval,
                            base_model=base_model, teachers=teachers(eval_ds),
                            proposer=proposer_of(recipe.eval, recipe.distill))
    log_evaluation(result)
    print(comparison_table(result.metrics))
    if note := misrouted_note(result.metrics):
        print(note)


def _state_carrying_layers(model_config) -> int:
    """Layers (linear attention, convolution, Mamba) whose state runs on from one token to the next whatever
    the position_ids say: packed rows are not exact there without a varlen kernel, which takes the examples'
    bounds."""
    from mlflow_finetune_plugin.models.architecture import attention_layers

    if model_config is None:
        return 0
    try:
        return sum(not layer.attention for layer in attention_layers(model_config))
    # a config without the usual layer counts: nothing known to carry state
    except (AttributeError, TypeError):
        return 0


def _varlen_attention(recipe) -> bool:
    return (recipe.model.attn_implementation or "") in FLASH_ATTENTION


def packing(recipe, tokenizer=None, train_ds=None, model_config=None) -> bool:
    """`data.packing`, with `auto` resolved: on where packing is exact and pays.

    TRL packs examples into rows of up to max_length (best-fit decreasing) with `position_ids` restarting at
    each example; transformers then keeps attention within each example (tested: packed logits equal per-row
    logits, sdpa and eager). With a varlen flash-attention kernel that costs nothing extra: auto packs. With
    sdpa and eager every packed row costs attention over its full length, which pays on mixed lengths and not
    on rows of similar length: auto estimates both from the tokenized training rows (`data/packing.py`) and
    prints why. Virtual-token adapters (prefix, prompt) prepend per row (`data.packing: true` next to them is
    refused; a recipe's `true` under their entry points is turned off with a note, config/loading.py), and
    remote code may ignore position_ids: never for those.
    """
    safe = recipe.adapter.type not in NOT_PACKABLE and not recipe.model.trust_remote_code
    carried = _state_carrying_layers(model_config) if not _varlen_attention(recipe) else 0
    if recipe.data.packing != "auto":
        if recipe.data.packing and not safe:
            print(
                "Warning: data.packing=true with trust_remote_code: packed rows may attend across each other "
                "if the model's own attention ignores position_ids; set data.packing: auto", file=sys.stderr)
        if recipe.data.packing and carried:
            print(
                f"Warning: data.packing=true: the model's {carried} linear-attention/recurrent layer(s) "
                "carry their state from one packed example into the next (position_ids separate attention "
                "only); set data.packing: auto (unpacked here) or use a varlen kernel "
                "(model.attn_implementation)",
                file=sys.stderr)
        written = str(recipe.data.packing).lower()
        _tag_packing(f"{'packed' if recipe.data.packing else 'unpacked'} (data.packing: {written})")
        return recipe.data.packing
    if not safe:
        _tag_packing(
            f"unpacked (data.packing auto: never for the {recipe.adapter.type} adapter or remote code)")
        return False
    if _varlen_attention(recipe):
        _tag_packing(f"packed (data.packing auto: padding-free with {recipe.model.attn_implementation})")
        return True
    if carried:
        print(f"data.packing auto does not pack: the model's {carried} linear-attention/recurrent layer(s) "
              "would carry their state from one packed example into the next")
        _tag_packing(
            f"unpacked (data.packing auto: {carried} linear-attention/recurrent layer(s) would carry their "
            "state across packed examples)")
        return False
    if train_ds is None or tokenizer is None or model_config is None:
        return False
    from mlflow_finetune_plugin.data import packing as estimate

    found = estimate.decide(tokenizer, train_ds, model_config, recipe.data.max_length,
                            recipe.train.batch_size, recipe.train.seed)
    print(found.describe(recipe.data.max_length))
    _tag_packing(
        f"{'packed' if found.pack else 'unpacked'} (data.packing auto: estimated {found.speedup:.2f}x as "
        f"fast packed, {found.padding_share:.0%} padding unpacked)")
    return found.pack


def _tag_packing(value: str) -> None:
    import mlflow

    from mlflow_finetune_plugin import tags

    if mlflow.active_run() is not None:
        mlflow.set_tag(tags.PACKING, value)


def fused_lm_head(recipe, model_config=None) -> bool | str:
    """`train.fused_lm_head`, with `auto` resolved: Liger's fused linear cross-entropy ("liger") where
    `train.kernels` puts Liger on this model (models/kernels.py; `model_config` given); else TRL's fused LM
    head on CUDA (Triton kernels over the labelled positions); elsewhere the chunked head (models/lm_head.py:
    no full logits, 0.28x the memory growth of a gemma3
    step and the same time on smollm2, docs/benchmarks.md, "Large vocabularies"). The chunked head takes each
    chunk's gradient inside the forward pass, which DDP refuses ("Expected to mark a variable ready only
    once"): with several ranks it gives way to the labelled-positions loss (`auto`: silently; `chunked` asked
    for by name: said once)."""
    import os
    import sys

    import torch

    value = recipe.train.fused_lm_head
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if value == "auto" and model_config is not None and kernels.takes_lm_head(recipe, kernels.resolve(
            recipe, model_config)):
        return "liger"
    if value == "auto":
        return True if torch.cuda.is_available() else ("chunked" if ranks == 1 else False)
    if value == "chunked" and ranks > 1:
        print(
            "Note: train.fused_lm_head: chunked is not taken with several ranks (DDP); the loss is computed "
            "from the labelled positions' logits", file=sys.stderr)
        return False
    return value


def _tag_loss(assistant_only: bool, share: float | None) -> None:
    """`finetune.loss_on` (assistant or all) and the share of the training rows' tokens the loss covers."""
    import mlflow

    from mlflow_finetune_plugin import tags

    where = "assistant" if assistant_only else "all"
    covered = f"{share:.1%} of the training tokens" if share is not None else "no tokens"
    print(
        "Loss on: "
        f"{'each assistant reply and its end-of-turn token' if assistant_only else 'whole conversations'} "
        f"({covered})")
    if mlflow.active_run() is not None:
        mlflow.set_tags({tags.LOSS_ON: where, **({tags.LOSS_SHARE: f"{share:.4f}"} if share is not None
                                                 else {})})
