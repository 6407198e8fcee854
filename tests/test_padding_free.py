"""Padding-free batches (TRL's `padding_free`, what `data.packing` uses with a flash-attention kernel): every
example in one row, `position_ids` restarting at each, no attention mask and no padding token. transformers 5 builds
each example's own causal mask from the position ids for sdpa and eager too, so on CPU the loss must equal the
padded batch's (same labelled tokens) within float tolerance; and the packed-rows layout the plugin keeps for
sdpa/eager (`PackedRowsCollator`) must as well."""

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

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
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
    assert not torch.allclose(_loss(model, input_ids=free["input_ids"], labels=free["labels"]), reference, atol=1e-3)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_segment_attention_trains_the_padded_loss_and_gradients_one_example_at_a_time(tiny_model_dir, monkeypatch):
    """The packed rows' padding-free layout under `segment_attention` (what the trainer uses on CPU): the same loss
    and gradients as the padded batch, each example attending over itself only, through SDPA calls of one example's
    length (no block-diagonal mask over the whole row), with grouped-query heads not copied."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from mlflow_finetune_plugin.models import attention
    from mlflow_finetune_plugin.train.objectives.sft_trainer import PackedRowsCollator

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    examples = [{"input_ids": e.tolist()} for e in _examples(model.config.vocab_size)]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    free = PackedRowsCollator(pad_token_id=0, padding_free=True)(
        [{"input_ids": examples[0]["input_ids"] + examples[1]["input_ids"], "seq_lengths": [9, 23]},
         {"input_ids": examples[2]["input_ids"] + examples[3]["input_ids"], "seq_lengths": [5, 16]}])
    assert free["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in free
    assert free["cu_seq_lens_q"].tolist() == [0, 9, 32, 37, 53]
    reference, reference_grads = _loss_and_grads(model, padded)

    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, *a, **kw: calls.append((q.shape[2], k.shape[1], kw.get("attn_mask"))) or
                        sdpa(q, k, *a, **kw))
    assert attention.segments_fit(model)
    with attention.segments(model, True):
        assert model.config._attn_implementation == attention.SEGMENTS
        loss, grads = _loss_and_grads(model, dict(free))
    assert model.config._attn_implementation == "sdpa"  # back for evaluation and generation
    layers = model.config.num_hidden_layers
    assert sorted(n for n, _, _ in calls) == sorted(list(LENGTHS) * layers)  # one call per example and layer
    assert all(mask is None for _, _, mask in calls)
    assert {heads for _, heads, _ in calls} == {model.config.num_key_value_heads}  # KV heads not copied
    assert torch.allclose(loss, reference, atol=1e-5)
    assert grads.keys() == reference_grads.keys()
    for name in grads:
        assert torch.allclose(grads[name], reference_grads[name], rtol=1e-4, atol=1e-6), name


def test_segment_attention_leaves_what_it_does_not_cover_to_sdpa(tiny_model_dir, monkeypatch):
    """A batch without example boundaries (evaluation's padded rows, the replay row) and a sliding window shorter
    than an example take transformers' SDPA path with its mask: the same outputs as plain SDPA."""
    from transformers import AutoModelForCausalLM

    from mlflow_finetune_plugin.models import attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    ids = torch.stack(_examples(model.config.vocab_size)[1:2] * 2)  # two rows of 23
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    plain = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    with attention.segments(model, True):
        assert torch.equal(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, plain)
        # a window of 8 tokens in every layer: the row's block mask with the window, as SDPA computes it
        for layer in model.model.layers:
            monkeypatch.setattr(layer.self_attn, "sliding_window", 8, raising=False)
        cu = torch.tensor([0, 9, 32], dtype=torch.int32)
        row = torch.cat(_examples(model.config.vocab_size)[:2])[None]
        positions = torch.cat([torch.arange(9), torch.arange(23)])[None]
        windowed = model(input_ids=row, position_ids=positions, use_cache=False, cu_seq_lens_q=cu,
                         cu_seq_lens_k=cu, max_length_q=23, max_length_k=23).logits
    assert torch.equal(windowed, model(input_ids=row, position_ids=positions, use_cache=False).logits)
