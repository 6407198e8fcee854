"""Which tokens of a chat row are trained: each assistant reply and its end-of-turn token (or every token,
with `data.assistant_only_loss: false`), except assistant turns with `"weight": 0` (the OpenAI fine-tuning
format).

The turn boundaries come from `models.turn_spans` (over `models.chat_format`), which finds them for any chat
template by rendering, so no `{% generation %}` markers are needed and no template falls back to whole
conversations. Rows are tokenized here into `input_ids` + `assistant_masks`; TRL's SFTTrainer takes both as
given, builds the labels, truncates and packs.
"""

from __future__ import annotations

import json


def has_zero_weights(*datasets) -> bool:
    """Whether any conversation of these datasets (or dicts of them) has an assistant turn with weight 0."""
    for ds in _flat(datasets):
        if "messages" in ds.column_names and any(m.get("weight") == 0 for msgs in ds["messages"]
                                                 for m in msgs):
            return True
    return False


def _flat(datasets):
    for ds in datasets:
        if isinstance(ds, dict):
            yield from ds.values()
        elif ds is not None:
            yield ds


def row_tools(example) -> list | None:
    """A row's `tools` column as a list (stored as JSON text where the rows' tools differ in shape)."""
    tools = example.get("tools")
    return json.loads(tools) if isinstance(tools, str) else tools


def with_turn_weights(tokenizer, dataset, assistant_only_loss: bool = True):
    """`dataset` (a `messages` column, optional `tools`) as `input_ids` + `assistant_masks`, weight-0 turns
    cleared."""
    from mlflow_finetune_plugin.models.turn_spans import tokenize_row

    if dataset is None:
        return None
    if isinstance(dataset, dict):
        return {name: with_turn_weights(tokenizer, ds, assistant_only_loss) for name, ds in dataset.items()}

    def tokenize(example):
        return tokenize_row(tokenizer, example["messages"], row_tools(example), assistant_only_loss)

    return dataset.map(tokenize, remove_columns=dataset.column_names, desc="Tokenizing with loss masks")


def trained_share(*datasets) -> float | None:
    """The share of tokens trained (mask 1) over the tokenized rows of these datasets; None if none is
    tokenized."""
    trained = total = 0
    for ds in _flat(datasets):
        if "assistant_masks" in ds.column_names:
            for mask in ds["assistant_masks"]:
                trained, total = trained + sum(mask), total + len(mask)
    return trained / total if total else None
