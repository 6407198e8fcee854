"""The LM head over chunks of tokens (models/lm_head.py): the same losses, log-probabilities and gradients as
the model's own logits, in training (SFT loss, KL replay) and in evaluation, on heads plain, soft-capped, tied
to the embedding and with PEFT's trainable token rows; chunks are made small here so that every test spans
several."""

from __future__ import annotations

import pytest
import torch

from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.models import lm_head
from tests.helpers import chat_rows, jsonl

GEMMA_TOKENS = [3, 7, 100]  # rows of the tiny Gemma's vocabulary given trainable rows in the unit tests


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 5 tokens at most, whatever the vocabulary."""
    original = lm_head.chunk_tokens
    monkeypatch.setattr(lm_head, "chunk_tokens", lambda vocab: min(5, original(vocab)))


def _gemma(vocab=16384, softcap=None, tied=True, tokens=None):
    """A 2-layer Gemma 3 with a large-ish vocabulary, LoRA on two projections (B made non-zero so that the
    tuned model differs from the base) and, with `tokens`, PEFT trainable rows for them."""
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                              query_pre_attn_scalar=16, sliding_window=128, layer_types=["sliding_attention",
                                                                                         "full_attention"],
                              tie_word_embeddings=tied, final_logit_softcapping=softcap,
                              initializer_range=0.1)
    torch.manual_seed(0)
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    if tokens:
        peft_config.trainable_token_indices = tokens
    model = get_peft_model(Gemma3ForCausalLM(config), peft_config).train()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    return model


def _grads(model) -> dict:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_grads(a: dict, b: dict, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=rtol, atol=atol), name


@pytest.mark.parametrize("softcap,tied,tokens", [(None, True, None), (None, True, GEMMA_TOKENS),
                                                 (30.0, True, GEMMA_TOKENS), (None, False, GEMMA_TOKENS)])
def test_chunked_cross_entropy_kl_and_logprobs_equal_the_full_logits(small_chunks, softcap, tied, tokens):
    model = _gemma(softcap=softcap, tied=tied, tokens=tokens)
    head = lm_head.head_of(model)
    assert head is not None and head.softcap == softcap
    # Tied trainable tokens wrap the LM head too: its rows come from the embedding's trained rows.
    assert (head.rows is not None) == bool(tokens and tied)
    ids = torch.randint(0, 16384, (2, 24))
    ids[:, 4] = 100  # a trained token, as input and as target
    labels = ids.clone()
    labels[:, :6] = -100

    reference = model(input_ids=ids, labels=labels).loss
    reference.backward()
    expected = _grads(model)
    with lm_head.hidden_states(model) as captured:
        out = model(input_ids=ids)
    assert out.logits.shape[-1] == 0  # the head computed nothing
    targets = labels[:, 1:]
    keep = targets != -100
    total, top1 = lm_head.cross_entropy(head, captured[-1][:, :-1][keep], targets[keep])
    (total / keep.sum()).backward()
    assert (total / keep.sum()).item() == pytest.approx(reference.item(), rel=1e-5)
    _assert_same_grads(_grads(model), expected)

    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1][keep].float()
        logps, is_top1 = lm_head.token_logprobs(head, captured[-1][:, :-1][keep], targets[keep])
    assert torch.allclose(logps, logits.log_softmax(-1).gather(1, targets[keep][:, None])[:, 0], atol=1e-5)
    assert torch.equal(is_top1, logits.argmax(-1) == targets[keep]) and top1 == int(is_top1.sum())

    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids[:1]).logits.float().log_softmax(-1)
    tuned = model(input_ids=ids[:1]).logits.float().log_softmax(-1)
    reference = (base.exp() * (base - tuned)).sum(-1).mean()
    reference.backward()
    expected = _grads(model)
    with lm_head.hidden_states(model) as captured:
        with torch.no_grad(), model.disable_adapter():
            model(input_ids=ids[:1])
        model(input_ids=ids[:1])
    kl = lm_head.kl_divergence(head, captured[1][0], head.without_rows(), captured[0][0]) / ids.shape[1]
    kl.backward()
    assert kl.item() == pytest.approx(reference.item(), rel=1e-4) and kl.item() > 0
    _assert_same_grads(_grads(model), expected)


def test_heads_it_cannot_reproduce_are_refused_and_the_head_is_left_as_it_was():
    from peft import LoraConfig, get_peft_model

    model = _gemma()
    head = model.get_output_embeddings()
    with lm_head.hidden_states(model):
        pass
    assert "forward" not in head.__dict__  # nothing left patched
    lora_on_head = get_peft_model(_gemma().get_base_model(), LoraConfig(r=2, target_modules=["lm_head"]))
    assert lm_head.head_of(lora_on_head) is None
    model.config.logit_scale = 0.5  # a family that scales its logits after the head
    assert lm_head.head_of(model) is None


# ------------------------------------------------------------------------------------------- in the SFT
# trainer


def _trainer(tmp_path, model="tiny", template=None, **overrides):
    """The SFT trainer the pipeline builds (LoRA, and with a chosen template its control tokens' trainable
    rows), its LoRA B made non-zero; and one batch of 3 rows."""
    from mlflow_finetune_plugin.data.splits import load_splits
    from mlflow_finetune_plugin.models.base import load_base_model, load_tokenizer
    from mlflow_finetune_plugin.train import templates
    from mlflow_finetune_plugin.train.adapters import attach
    from mlflow_finetune_plugin.train.objectives import sft
    from mlflow_finetune_plugin.train.trainers import training_arguments

    jsonl(tmp_path / "data" / "train.jsonl", chat_rows(6))
    recipe = load_recipe(tmp_path, "lora", overrides={
        "model.name": model, "data.max_length": 128, "train.max_steps": 1, "eval.enabled": False,
        "lora.dropout": 0.0, **({"model.chat_template": template} if template else {}), **overrides})
    tokenizer = load_tokenizer(recipe.model.name, chat_template=recipe.model.chat_template,
                               base_dir=recipe.project_dir)
    data = templates.for_template(recipe, load_splits(recipe), tokenizer, main=False)
    torch.manual_seed(0)
    base = load_base_model(recipe.model)
    trainable = templates.fit_model(recipe, base, tokenizer, main=False)
    peft_model = attach(base, recipe, trainable)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.02)
    args = training_arguments(recipe, "lm-head-test", None)
    args["output_dir"] = str(tmp_path / "out")
    trainer = sft.build_trainer(recipe, peft_model, tokenizer, data.train, None, args, callbacks=[])
    return trainer, trainer.data_collator([trainer.train_dataset[i] for i in range(3)]), trainable


def _trainer_loss(trainer, batch, side, **kwargs):
    model = trainer.model.train()
    if side == "model":  # transformers + PEFT: the model's own loss from its whole logits
        loss = model(**batch, use_cache=False).loss
    else:
        trainer.fused_lm_head = side
        loss = trainer.compute_loss(model, dict(batch), **kwargs)
    loss.backward()
    return loss.item(), _grads(model)


@pytest.mark.parametrize("model,template", [("tiny", None), ("tiny-gemma3", "gemma")])
def test_the_chunked_sft_loss_is_the_models_own_with_the_same_gradients(tmp_path, small_chunks, model,
                                                                        template):
    trainer, batch, trainable = _trainer(tmp_path, model, template)
    assert bool(trainable) == bool(template)  # the template's control tokens train through trainable rows
    head = trainer.model.get_output_embeddings()
    widths = []
    probe = head.register_forward_hook(lambda m, args, out: widths.append(out.shape[-1]))
    try:
        loss, grads = _trainer_loss(trainer, batch, "chunked")
    finally:
        probe.remove()
    assert widths == [0]  # no logits: the loss came from the chunks
    accuracy = trainer._metrics["train"]["mean_token_accuracy"][-1]
    expected, expected_grads = _trainer_loss(trainer, batch, "model")
    assert loss == pytest.approx(expected, rel=1e-5, abs=1e-4)
    _assert_same_grads(grads, expected_grads)
    labelled, labelled_grads = _trainer_loss(trainer, batch, False)
    assert labelled == pytest.approx(loss, rel=1e-5)
    assert trainer._metrics["train"]["mean_token_accuracy"][-1] == pytest.approx(accuracy)
    # Divided by the items of an accumulated batch, as transformers divides its own loss.
    items = int((batch["labels"][:, 1:] != -100).sum()) + 7
    chunked_items, _ = _trainer_loss(trainer, batch, "chunked", num_items_in_batch=items)
    plain_items, _ = _trainer_loss(trainer, batch, False, num_items_in_batch=items)
    assert chunked_items == pytest.approx(plain_items, rel=1e-5) and chunked_items < loss
    # The evaluation loss during training (no gradient, the model in eval mode) comes from the chunks too.
    trainer.model.eval()
    with torch.no_grad():
        trainer.fused_lm_head = "chunked"
        eval_chunked = trainer.compute_loss(trainer.model, dict(batch)).item()
        trainer.fused_lm_head = False
        eval_whole = trainer.compute_loss(trainer.model, dict(batch)).item()
    assert eval_chunked == pytest.approx(eval_whole, rel=1e-5)


def test_trls_fused_head_gives_way_to_the_chunked_one_where_token_rows_wrap_the_head(tmp_path, small_chunks):
    """`fused_lm_head: true` (auto on CUDA) with model.chat_template on a base model: PEFT's trainable-token
    rows wrap the LM head, which has no `.bias` for TRL's fused head to read (found on an H200: every gemma3
    run failed with "'TrainableTokensWrapper' object has no attribute 'bias'"). The chunked head, which knows
    those rows, takes it."""
    trainer, batch, trainable = _trainer(tmp_path, "tiny-gemma3", "gemma")
    assert trainable
    loss, grads = _trainer_loss(trainer, batch, True)
    assert trainer.fused_lm_head == "chunked"
    expected, expected_grads = _trainer_loss(trainer, batch, "model")
    assert loss == pytest.approx(expected, rel=1e-5, abs=1e-4)
    _assert_same_grads(grads, expected_grads)


def test_the_chunked_loss_under_cpu_bf16_autocast_keeps_the_head_in_fp32(tmp_path, small_chunks):
    """Under CPU bf16 autocast (models/precision.py) the chunked head computes in fp32 as the patched head
    does: the same loss and gradients as the labelled positions' logits. (The backward runs outside autocast,
    as Trainer runs it: on CPU a backward inside it would run the head's backward matmuls in bf16.)"""
    from mlflow_finetune_plugin.models.precision import fp32_where_it_matters

    trainer, batch, _ = _trainer(tmp_path, "tiny-gemma3", "gemma")
    model = trainer.model.train()
    head = model.get_output_embeddings()
    results = {}
    for side in ("chunked", False):
        trainer.fused_lm_head = side
        with fp32_where_it_matters(model, True), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = trainer.compute_loss(model, dict(batch))
            assert "forward" in head.__dict__  # the precision patch is back in place after the chunked pass
        loss.backward()
        results[side] = loss.item(), _grads(model)
    assert "forward" not in head.__dict__
    (chunked, chunked_grads), (plain, plain_grads) = results["chunked"], results[False]
    assert chunked == pytest.approx(plain, rel=1e-5)  # a bf16 head would round the logits: ~1e-3 apart
    # the LoRA branches compute in bf16 under the guards (their sum with the base output is fp32): the heads'
    # fp32 gradients, apart in their last bits, come back through bf16 backward matmuls, apart by bf16's steps
    # at most
    _assert_same_grads(chunked_grads, plain_grads, rtol=2e-2, atol=1e-3)


def test_the_kl_replay_term_from_chunks_equals_the_one_from_whole_logits(tmp_path, small_chunks):
    trainer, _, _ = _trainer(tmp_path, "tiny-gemma3", "gemma",
                             **{"data.replay": True, "data.replay_loss": "kl"})
    assert trainer.replay_kl
    model = trainer.model.train()
    results = {}
    for side in ("chunked", False):
        trainer.fused_lm_head, trainer._replay_at = side, 0
        kl = trainer._replay_kl(model)
        kl.backward()
        results[side] = kl.item(), _grads(model)
    (chunked, chunked_grads), (plain, plain_grads) = results["chunked"], results[False]
    assert plain > 0 and chunked == pytest.approx(plain, rel=1e-4)
    _assert_same_grads(chunked_grads, plain_grads)


# ------------------------------------------------------------------------------------------------- in
# evaluation


def test_evaluation_scores_through_chunks_as_through_whole_logits(small_chunks):
    """completion_logps (reference loss, preference margins, forgetting) and the scoring pass that generation
    continues from give the model's own log-probabilities, tuned and with the adapter off."""
    import contextlib
    from types import SimpleNamespace

    from mlflow_finetune_plugin.evaluate import scoring
    from mlflow_finetune_plugin.evaluate.preferences import completion_logps

    model = _gemma(tokens=GEMMA_TOKENS).eval()
    ids = torch.randint(5, 16384, (3, 20))
    ids[:, 6] = 100
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    completion = mask.clone()
    completion[:, :8] = 0
    pairs = [(ids[i, :8].tolist(), ids[i, 8:20 if i < 2 else 15].tolist()) for i in range(3)]
    tokenizer = SimpleNamespace(pad_token_id=0)  # all score_and_prefill reads of it

    def scores():
        with torch.no_grad():
            return completion_logps(model, ids, mask, completion), scoring.score_and_prefill(model, tokenizer,
                                                                                             pairs)

    for adapter_off in (False, True):
        with model.disable_adapter() if adapter_off else contextlib.nullcontext():
            chunked, prefill = scores()
            with pytest.MonkeyPatch.context() as patch:  # the model's whole logits instead
                patch.setattr(lm_head, "head_of", lambda m: None)
                patch.setattr(scoring, "head_of", lambda m: None)
                whole, whole_prefill = scores()
        assert torch.allclose(chunked, whole, atol=1e-4)
        assert prefill.n_tokens == whole_prefill.n_tokens == 12 + 12 + 7
        assert prefill.nll == pytest.approx(whole_prefill.nll, rel=1e-5)
