"""Which adapters vLLM serves: one set of rules for training's `finetune.vllm_compatible` tag and for
serving."""

from __future__ import annotations

import pytest

from mlflow_finetune_plugin.vllm_rules import VLLM_LORA_RANKS, adapter_servable, lora_servable, max_lora_rank


@pytest.mark.parametrize(("kwargs", "servable", "reason"), [
    ({"r": 16}, True, "max_lora_rank"),
    ({"r": 12}, True, "max_lora_rank"),  # any rank up to the server's max_lora_rank (checked on real vLLM)
    ({"r": 1024}, False, "r=1024"),
    ({"r": 16, "use_dora": True}, False, "DoRA"),
    ({"r": 16, "bias": "all"}, False, "biases"),
    ({"r": 16, "bias": "lora_only"}, False, "biases"),
    ({"r": 16, "modules_to_save": ["lm_head"]}, False, "whole modules"),
])
def test_lora_servable(kwargs, servable, reason):
    ok, why = lora_servable(**kwargs)
    assert ok is servable and reason in why


def test_adapter_servable_reads_adapter_config_json():
    lora = {"peft_type": "LORA", "r": 8, "use_dora": False, "bias": "none", "modules_to_save": None}
    assert adapter_servable(lora) == lora_servable(8)
    assert adapter_servable({**lora, "use_dora": True}) == lora_servable(8, use_dora=True)
    assert adapter_servable({"peft_type": "IA3"}) == (False,
                                                      "vLLM serves LoRA adapters only; this is a IA3 adapter")
    # model.chat_template's control tokens trained beside LoRA: vLLM's LoRA loader has no such weights
    ok, why = adapter_servable({**lora, "trainable_token_indices": {"embed_tokens": [5], "lm_head": [5]}})
    assert not ok and "train token rows" in why
    # LoRA on a mixture's fused experts (PEFT's target_parameters, gpt-oss): not a format vLLM's loader reads
    ok, why = adapter_servable({**lora, "target_parameters": ["mlp.experts.gate_up_proj"]})
    assert not ok and "mlp.experts.gate_up_proj" in why and "--engine transformers" in why


def test_max_lora_rank_is_the_smallest_supported_rank_that_fits():
    assert max_lora_rank([8]) == 8 and max_lora_rank([8, 12]) == 16 and max_lora_rank([300]) == 320
    assert max_lora_rank([VLLM_LORA_RANKS[-1]]) == VLLM_LORA_RANKS[-1]
