"""What a model can do, asked of the model (models/architecture.py), and every stage that relies on it (issue
52).

Tiny random models straight from transformers' config classes (tests/arch_models.py): Qwen3.5 (a Gated
DeltaNet layer beside a full-attention one, its torch fallback on CPU), gpt-oss (4 experts as fused 3-D
parameters, a router with its load-balancing loss) and Gemma 4 (full-attention layers of another head_dim than
the sliding ones).
"""

from __future__ import annotations

import json
import math
import os

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from mlflow_finetune_plugin import tags
from tests.arch_models import build
from tests.matrix_helpers import write_chat_project

PROMPTS = [[{"role": "system", "content": "Answer "
                                          "briefly."}, {"role": "user", "content": f"What is {i} plus {i}?"}]
           for i in range(3)] + [[{"role": "user", "content": "Hello there, who are you?"}]]
REFERENCES = ["2 plus 2 is 4.", "That is 8.", "It is six.", "A bot."]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    return {kind: build(kind, root / kind) for kind in ("qwen3_5", "gpt_oss", "gemma4")}


def _load(path):
    from transformers import AutoModelForCausalLM

    from mlflow_finetune_plugin.logged_model import LoadedModel
    from mlflow_finetune_plugin.models.base import load_tokenizer

    return LoadedModel(AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(str(path)), {})


def test_the_cache_says_what_it_can_do(models):
    from transformers import AutoConfig

    from mlflow_finetune_plugin.models.architecture import cache_abilities
    from mlflow_finetune_plugin.models.tiny import tiny_model_path

    plain = cache_abilities(AutoConfig.from_pretrained(tiny_model_path()))
    assert (plain.crop, plain.repeat, plain.select, plain.concat) == (True, True, True, True)
    hybrid = cache_abilities(AutoConfig.from_pretrained(models["qwen3_5"]))
    assert (hybrid.crop, hybrid.repeat, hybrid.select, hybrid.concat) == (False, False, True, False)
    assert "LinearAttentionLayer" in hybrid.why
    # sliding layers: a shared prefix repeats, a crop could go past the window
    for kind in ("gpt_oss", "gemma4"):
        sliding = cache_abilities(AutoConfig.from_pretrained(models[kind]))
        assert (sliding.crop, sliding.repeat, sliding.concat) == (False, True, False), kind


def test_per_layer_shapes_and_the_packing_estimate(models):
    from transformers import AutoConfig

    from mlflow_finetune_plugin.data.packing import span_from_config
    from mlflow_finetune_plugin.models.architecture import attention_layers
    from mlflow_finetune_plugin.train.objectives.sft import _state_carrying_layers

    gemma4 = AutoConfig.from_pretrained(models["gemma4"])
    with pytest.raises(Exception, match="per-layer attribute"):
        gemma4.head_dim  # noqa: B018 - what data.packing auto read before
    assert [layer.head_dim for layer in attention_layers(gemma4)] == [16, 32]
    assert 0 < span_from_config(gemma4) < math.inf
    qwen = AutoConfig.from_pretrained(models["qwen3_5"])
    assert [layer.attention for layer in attention_layers(qwen)] == [False, True]
    assert _state_carrying_layers(qwen) == 1 and _state_carrying_layers(gemma4) == 0
    assert 0 < span_from_config(qwen) < math.inf


def test_packed_rows_are_not_exact_for_linear_attention(models):
    """Why packing auto never packs Qwen3.5 without a varlen kernel: the Gated DeltaNet layer (its torch
    fallback, on CPU) runs its state on from one packed example into the next, whatever the position_ids
    say."""
    loaded = _load(models["qwen3_5"])
    first, second = [5, 6, 7, 8, 9], [10, 11, 12, 13]
    with torch.no_grad():
        alone = loaded.model(input_ids=torch.tensor([second])).logits[0]
        packed = loaded.model(input_ids=torch.tensor([first + second]),
                              position_ids=torch.tensor([list(range(5)) + list(range(4))])).logits[0, 5:]
    assert not torch.allclose(alone, packed, atol=1e-4)


@pytest.mark.parametrize("kind", ["qwen3_5", "gemma4", "tiny"])
def test_evaluation_scores_every_cache_as_the_plain_path_does(models, kind):
    """Batched answers and reference NLL (the shared prefill where the cache allows it, else two passes) equal
    each prompt answered alone and each reference scored alone."""
    from mlflow_finetune_plugin.evaluate.contenders import answer_and_score
    from mlflow_finetune_plugin.evaluate.scoring import reference_nll
    from mlflow_finetune_plugin.logged_model import generate
    from mlflow_finetune_plugin.models.tiny import tiny_model_path

    loaded = _load(tiny_model_path() if kind == "tiny" else models[kind])
    answers, nll, count = answer_and_score(loaded, PROMPTS, REFERENCES, max_new_tokens=6)
    alone = [generate(loaded, p, max_new_tokens=6) for p in PROMPTS]
    scored = [reference_nll(loaded.model, loaded.tokenizer, [p], [r]) for p, r in zip(PROMPTS, REFERENCES)]
    assert answers == alone
    assert count == sum(n for _, n in scored)
    assert nll == pytest.approx(sum(v for v, _ in scored), rel=1e-4)


def test_serving_steps_only_plain_caches(models):
    from mlflow_finetune_plugin.models.tiny import tiny_model_path
    from mlflow_finetune_plugin.serving.stepping import steppable

    assert steppable(_load(tiny_model_path()).model)
    assert not any(steppable(_load(models[kind]).model) for kind in models)


def test_experts_are_found_and_lora_reaches_them(models):
    from peft import get_peft_model

    from mlflow_finetune_plugin.config.schema import LoraAdapter
    from mlflow_finetune_plugin.models.architecture import fused_expert_parameters, moe_of
    from mlflow_finetune_plugin.train.adapters.lora import peft_config

    model = _load(models["gpt_oss"]).model
    experts = moe_of(model)
    assert (experts.router_logits, experts.total, experts.active) == (True, 4, 2)
    assert experts.fused == ("experts.gate_up_proj", "experts.down_proj")
    assert moe_of(_load(models["qwen3_5"]).model) is None  # its conv1d weight is 3-D too, but a torch layer's
    with_dropout = peft_config(LoraAdapter(r=4, dropout=0.05), model)  # PEFT: no dropout on parameters
    assert with_dropout.target_parameters and with_dropout.lora_dropout == 0.0
    peft = get_peft_model(model, peft_config(LoraAdapter(r=4, dropout=0.0), model))
    adapted = {n for n, p in peft.named_parameters() if p.requires_grad and ".experts." in n}
    assert adapted and all("lora_" in n for n in adapted)
    assert fused_expert_parameters(peft.get_base_model()) == experts.fused  # PEFT's wrappers are seen through
    none = peft_config(LoraAdapter(r=4, dropout=0.0, target_parameters=[]), model)
    assert not none.target_parameters


def _run(project, root, method, overrides):
    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.train.job import run

    mlflow.set_experiment(project.name)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert run(load_recipe(project, method=method, overrides=overrides)) == 0
    finally:
        os.chdir(cwd)
    client = MlflowClient()
    (finished,) = client.search_runs([client.get_experiment_by_name(project.name).experiment_id])
    return finished


QUICK = {"train.max_steps": 2, "train.batch_size": 2, "train.logging_steps": 1, "train.save_steps": 2,
         "eval.max_examples": 2, "eval.max_new_tokens": 4, "eval.fewshot_k": 1, "eval.traces": False,
         "eval.forgetting": False}


@pytest.mark.integration
@pytest.mark.parametrize("packing, head", [(True, "chunked"), (False, "chunked"), (False, False),
                                           (True, True)])
def test_gpt_oss_lora_trains_its_experts_with_the_router_loss(models, tmp_path, tracking_uri, packing, head):
    project = write_chat_project(tmp_path / f"moe-{packing}-{head}", "moe")
    run = _run(project, tmp_path, "lora", {"model.name": str(models["gpt_oss"]), "data.packing": packing,
                                           "lora.dropout": 0.05,
                                           "train.fused_lm_head": head, **QUICK})
    assert run.info.status == "FINISHED"
    assert run.data.tags[tags.PACKING].startswith("packed" if packing else "unpacked")
    assert run.data.tags[tags.ROUTER_AUX_LOSS].startswith("0.001")
    assert "target_parameters" in run.data.tags[tags.LORA_EXPERTS]
    assert "lora.dropout 0.05 is not applied" in run.data.tags[tags.LORA_EXPERTS]
    assert 0 < run.data.metrics["trainable_share"] < 1
    assert run.data.metrics["train/aux_loss" if "train/aux_loss" in run.data.metrics else "aux_loss"] > 0
    assert math.isfinite(run.data.metrics["eval/tuned/loss"])  # evaluation decodes after training


@pytest.mark.integration
def test_the_router_loss_counts_the_real_tokens_of_packed_rows_on_every_head(models, tmp_path, tracking_uri):
    """The first step's load-balancing loss on packed rows is the same whether TRL's fused head (the CUDA
    default) or the chunked head takes the loss: both over the real tokens only. Before, TRL's fused head took
    it over the rows' end padding as well (it sees no attention mask on packed rows)."""
    aux = {}
    for head in (True, "chunked"):
        project = write_chat_project(tmp_path / f"aux-{head}", "aux")
        # rows of unequal length: the packed rows of a batch end in padding
        rows = [{"messages": [{"role": "user", "content": f"Say {i}."},
                              {"role": "assistant", "content": " ".join(["word"] * (1 + 12 * i))}]}
                for i in range(4)]
        (project / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        run = _run(project, tmp_path, "lora", {"model.name": str(models["gpt_oss"]), "data.packing": True,
                                               "train.fused_lm_head": head, "train.rehearsal": False,
                                               "data.max_length": 96, **QUICK, "train.max_steps": 1})
        history = MlflowClient().get_metric_history(run.info.run_id, "train/aux_loss") or \
            MlflowClient().get_metric_history(run.info.run_id, "aux_loss")
        aux[head] = history[0].value
    assert aux[True] == pytest.approx(aux["chunked"], rel=1e-4)


@pytest.mark.integration
def test_full_fine_tune_of_a_base_model_with_a_chosen_template_scores_its_base(tmp_path, tracking_uri):
    """-e full with model.chat_template on a base whose tokenizer lacks the template's tokens: the trained
    model grew embedding rows, and the base contender is grown the same way (before: IndexError in
    evaluation)."""
    from tests.test_base_models import _base_copy

    base = _base_copy("mistral", tmp_path / "mistral-base")  # untied head: both matrices grow
    project = write_chat_project(tmp_path / "full-template", "full-template")
    run = _run(project, tmp_path, "full", {"model.name": str(base), "model.chat_template": "chatml", **QUICK})
    assert run.info.status == "FINISHED"
    assert math.isfinite(run.data.metrics["eval/base/loss"]) and math.isfinite(
        run.data.metrics["eval/tuned/loss"])
    assert run.data.metrics["trainable_share"] == 1.0
