"""Padding-free batches (TRL's `padding_free`, what `data.packing` uses with a flash-attention kernel): every
example in one row, `position_ids` restarting at each, no attention mask and no padding token. transformers 5
builds each example's own causal mask from the position ids for sdpa and eager too, so on CPU the loss must
equal the padded batch's (same labelled tokens) within float tolerance; and the packed-rows layout the plugin
keeps for sdpa/eager (`PackedRowsCollator`) must as well."""

from __future__ import annotations

import pytest
import torch

LENGTHS = (9, 23, 5, 16)


def _examples(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g) for n in LENGTHS]


def _loss(model, **batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).loss


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_and_packed_rows_give_the_padded_loss(attn, tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from mlflow_finetune_plugin.train.objectives.sft_trainer import PackedRowsCollator

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation=attn)
    model.eval()
    examples = [{"input_ids": e.tolist()} for e in _examples(model.config.vocab_size)]

    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    free = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert free["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in free  # no padding at all
    assert free["position_ids"][0].tolist() == [i for n in LENGTHS for i in range(n)]
    # Two packed rows of two examples each, as the plugin keeps them for sdpa/eager.
    rows = PackedRowsCollator(pad_token_id=0)(
        [{"input_ids": examples[0]["input_ids"] + examples[1]["input_ids"], "seq_lengths": [9, 23]},
         {"input_ids": examples[2]["input_ids"] + examples[3]["input_ids"], "seq_lengths": [5, 16]}])
    rows.pop("attention_mask")  # the trainer removes it: the mask comes from the position ids

    reference = _loss(model, **padded)
    assert torch.allclose(_loss(model, **free), reference, atol=1e-5), attn
    assert torch.allclose(_loss(model, **rows), reference, atol=1e-5), attn
    # And it is not a coincidence: the same flat row without position ids attends across examples.
    assert not torch.allclose(_loss(model, input_ids=free["input_ids"], labels=free["labels"]), reference,
                              atol=1e-3)
