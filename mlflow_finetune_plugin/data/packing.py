"""`data.packing: auto`, decided from the training rows themselves: pack when packed rows cost less than
padded batches of the same examples.

Packing is exact here (`position_ids` restart at each example, attention stays within it), so the question is
only speed. Without a varlen flash-attention kernel every packed row pays attention over its whole length,
while padded batches pay for their padding: which one wins depends on the spread of the lengths and on
`data.max_length` together (docs/benchmarks-history.md, 1b: 2.21x faster packed on mixed lengths at 512
tokens, 0.47x on similar lengths at 1024).

The estimate: a row of L tokens costs `L * (1 + L / span)`, linear layers plus attention, where `span` is the
length at which a token's attention costs as much as its linear layers, and every step (one forward and
backward pass) costs `PASS_TOKENS` more. `span_from_config` derives the span from the model's shape (the ratio
of the two FLOP counts) times `ATTENTION_EFFICIENCY`: masked SDPA runs far below the matmuls' speed. Both
constants were fitted on smollm2 on CPU (`bench/attention_cost.py`, docs/benchmarks-history.md 1c: a pass of L
tokens took 356 ms + 2.27 ms x L
+ 0.0053 ms x L^2: span 427 tokens, 3,891 x 0.11 = 428 from the shape). One epoch is then costed both ways
over (a sample of) the tokenized rows: padded, the rows shuffled into batches of `train.batch_size`, each
padded to its longest; packed, TRL's best-fit-decreasing packing into rows of up to `max_length`, batched the
same way. Auto packs when padding costs at least `MARGIN` times as much. Replay's KL row, scored once a step,
is left out: it favours packing (fewer steps), so the estimate errs towards not packing.

With packing the same `train.batch_size` counts packed rows, so the number of steps follows the decision; the
run prints the decision and why, and tags the run `finetune.packing` with it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SAMPLE = 2000
MARGIN = 1.1
# Fitted on smollm2, CPU, SDPA, LoRA (bench/attention_cost.py; docs/benchmarks-history.md 1c): measured span /
# FLOP-ratio span, and the fixed cost of a pass in tokens' worth (356 ms / 2.27 ms a token).
ATTENTION_EFFICIENCY = 0.11
PASS_TOKENS = 150


@dataclass
class PackingEstimate:
    pack: bool
    padded_cost: float
    packed_cost: float
    padding_share: float  # of the padded batches' positions
    rows: int  # examples costed (a sample of at most SAMPLE)
    packed_rows: int
    span: float

    @property
    def speedup(self) -> float:
        return self.padded_cost / self.packed_cost if self.packed_cost else 1.0

    def describe(self, max_length: int) -> str:
        verb = "packs" if self.pack else "does not pack"
        return (f"data.packing auto {verb}: one epoch estimated {self.speedup:.2f}x as fast packed "
                f"({self.padding_share:.0%} of padded batch positions would be padding; {self.rows} examples "
                f"in {self.packed_rows} packed rows of up to {max_length} tokens, each paying attention over "
                f"its whole length); set data.packing: true or false to choose")


def span_from_config(config) -> float:
    """Tokens at which attention per token costs as much as the linear layers, from the model's shape.

    Forward FLOPs per token: 2 x (linear weights, LM head included) for the matmuls, and 4 x (attention width)
    x L per attention layer for QK^T and AV over a row of L tokens; the span is their ratio at equal cost,
    scaled by the measured efficiency of masked attention. Each layer is read from its own config
    (`models.architecture.attention_layers`: Gemma 4's layers differ in head_dim); linear-attention layers
    (Qwen3.5's Gated DeltaNet) add no cost that grows with L, and a mixture of experts runs its active
    experts' MLPs only.
    """
    from mlflow_finetune_plugin.models.architecture import attention_layers, text_config

    layers = attention_layers(config)
    config = text_config(config)
    d = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or 4 * d
    active = next((v for k in ("num_experts_per_tok", "top_k_experts") if (v := getattr(config, k, None))), 1)
    linear = config.vocab_size * d + sum(
        2 * d * layer.heads * layer.head_dim + 2 * d * layer.kv_heads * layer.head_dim + 3 * d * inter
        * active for layer in layers)
    width = sum(layer.heads * layer.head_dim for layer in layers if layer.attention)
    return ATTENTION_EFFICIENCY * linear / (2 * width) if width else float("inf")


def row_cost(length: int, span: float) -> float:
    return length * (1.0 + length / span)


def example_lengths(tokenizer, dataset, max_length: int, seed: int, sample: int = SAMPLE) -> list[int]:
    """Token lengths of (a seeded sample of) the training rows, cut at `max_length` as training cuts them."""
    from mlflow_finetune_plugin.data.loss_masks import row_tools
    from mlflow_finetune_plugin.models.turn_spans import tokenize_row

    picked = list(range(len(dataset)))
    if len(picked) > sample:
        picked = sorted(random.Random(seed).sample(picked, sample))
    rows = dataset.select(picked)
    if "input_ids" in rows.column_names:
        return [min(len(ids), max_length) for ids in rows["input_ids"]]
    lengths = []
    for row in rows:
        ids = tokenize_row(tokenizer, row["messages"], row_tools(row))["input_ids"]
        lengths.append(min(len(ids), max_length))
    return lengths


def estimate(lengths: list[int], max_length: int, batch_size: int, span: float, seed: int) -> PackingEstimate:
    """One epoch of `lengths` costed padded and packed (TRL's best-fit decreasing), batches of
    `batch_size`."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    def batched_cost(row_lengths: list[int]) -> tuple[float, int]:
        order = random.Random(seed).sample(row_lengths, len(row_lengths))
        cost, positions = 0.0, 0
        for i in range(0, len(order), batch_size):
            batch = order[i: i + batch_size]
            cost += PASS_TOKENS + len(batch) * row_cost(max(batch), span)
            positions += len(batch) * max(batch)
        return cost, positions

    lengths = [n for n in lengths if n > 0]
    padded, positions = batched_cost(lengths)
    packed_ds = pack_dataset(Dataset.from_dict({"input_ids": [[0] * n for n in lengths]}), max_length, "bfd")
    packed_lengths = [len(ids) for ids in packed_ds["input_ids"]]
    packed, _ = batched_cost(packed_lengths)
    return PackingEstimate(pack=padded >= MARGIN * packed, padded_cost=padded, packed_cost=packed,
                           padding_share=1 - sum(lengths) / positions if positions else 0.0,
                           rows=len(lengths), packed_rows=len(packed_lengths), span=span)


def decide(tokenizer, dataset, model_config, max_length: int, batch_size: int, seed: int) -> PackingEstimate:
    lengths = example_lengths(tokenizer, dataset, max_length, seed)
    return estimate(lengths, max_length, batch_size, span_from_config(model_config), seed)
