"""The adapter x quantization matrix: every adapter (and the variants worth their own row, on a full-precision
or a 4/8-bit base) through the same checks, with the SFT step; the objectives over the adapters are in
tests/test_objectives.py.

Adding an adapter = its module in adapters/, its config in config/schema.py, and a row in CASES/TRAINABLE
below (a missing row fails).
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlflow_finetune_plugin.config.checks import NOT_PACKABLE, NOT_QUANTIZABLE
from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.config.presets import PRESETS
from mlflow_finetune_plugin.config.schema import (
    ADAPTER_CONFIGS,
    IA3Adapter,
    LoraAdapter,
    ModelConfig,
    PromptAdapter,
)
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.logged_model import load_logged_model, log_finetuned_model
from mlflow_finetune_plugin.models.tiny import TINY_MODEL_REF
from mlflow_finetune_plugin.train import quantization
from mlflow_finetune_plugin.train.adapters import ADAPTERS, adapter_of, lora
from tests.helpers import REPO, chat_rows, write_project

# case id -> (entry point, recipe overrides). One row per entry point with its defaults, plus variants: other
# settings of an adapter, and adapters on a quantized base.
# GRPO and the reward model have their own files (tests/test_grpo.py, tests/test_rlhf.py): GRPO samples to
# train, a reward model is a sequence classifier with a score head, not a causal LM with an adapter.
# distill: a teacher answers first (tests/test_distill.py); optimize-prompt trains nothing
# (tests/test_prompt_search.py)
OWN_FILES = {"grpo", "reward", "distill", "optimize-prompt"}
CASES = {name: (name, {}) for name in PRESETS if name not in OWN_FILES} | {
    "lora-dora-rslora": ("lora", {"lora.use_dora": True, "lora.use_rslora": True, "lora.r": 8}),
    "lora-top-layers": ("lora", {"lora.layers": 2}),
    "qlora-8bit": ("qlora", {"qlora.bits": 8}),
    "prefix-projection": ("prefix", {"prefix.prefix_projection": True, "prefix.encoder_hidden_size": 32}),
    "p_tuning": ("prompt", {"prompt.kind": "p_tuning"}),
    "prompt-text-init": ("prompt",
                         {"prompt.init": "text",
                          "prompt.init_text": "Answer the customer's question politely."}),
    "ia3-4bit": ("ia3", {"model.quantization": "4bit"}),
    "prompt-8bit": ("prompt", {"model.quantization": "8bit"}),
}

_LINEAR = r"model\.layers\.\d\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
# case id -> (pattern every trainable parameter name matches, number of trainable tensors) on the tiny model.
TRAINABLE = {
    "lora": (rf"base_model\.model\.{_LINEAR}\.lora_[AB]\.default\.weight", 4 * 7 * 2),
    "lora-dora-rslora": (
        rf"base_model\.model\.{_LINEAR}\.(lora_[AB]|lora_magnitude_vector)\.default\.weight",
        4 * 7 * 3,
    ),
    "lora-top-layers": (
        r"base_model\.model\.model\.layers\.[23]\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
        r"\.lora_[AB]\.default\.weight",
        2 * 7 * 2,
    ),
    "qlora": (rf"base_model\.model\.{_LINEAR}\.lora_[AB]\.default\.weight", 4 * 7 * 2),
    "qlora-8bit": (rf"base_model\.model\.{_LINEAR}\.lora_[AB]\.default\.weight", 4 * 7 * 2),
    "adapter": (
        r"base_model\.model\.model\.layers\.\d\.(self_attn\.o_proj|mlp\.down_proj)\.peanut_[AB]\.default\.weight",
        4 * 2 * 2,
    ),
    "prefix": (r"prompt_encoder\.default\.embedding\.weight", 1),
    "prefix-projection": (r"prompt_encoder\.default\.(embedding\.weight|transform\.[02]\.(weight|bias))", 5),
    "prompt": (r"prompt_encoder\.default\.embedding\.weight", 1),
    "p_tuning": (r"prompt_encoder\.default\.(embedding\.weight|mlp_head\.[024]\.(weight|bias))", 7),
    "prompt-text-init": (r"prompt_encoder\.default\.embedding\.weight", 1),
    "ia3": (
        r"base_model\.model\.model\.layers\.\d\.(self_attn\.[kv]_proj|mlp\.down_proj)\.ia3_l\.default",
        4 * 3,
    ),
    "ia3-4bit": (
        r"base_model\.model\.model\.layers\.\d\.(self_attn\.[kv]_proj|mlp\.down_proj)\.ia3_l\.default",
        4 * 3,
    ),
    "prompt-8bit": (r"prompt_encoder\.default\.embedding\.weight", 1),
    "full": (r".*", 38),
    "multitask": (rf"base_model\.model\.{_LINEAR}\.lora_[AB]\.default\.weight", 4 * 7 * 2),
    "dpo": (rf"base_model\.model\.{_LINEAR}\.lora_[AB]\.default\.weight", 4 * 7 * 2),
    "kto": (rf"base_model\.model\.{_LINEAR}\.lora_[AB]\.default\.weight", 4 * 7 * 2),
}
# Trained, saved and reloaded: every entry point plus the variants that train differently (keeps the file
# fast). multitask, dpo and kto train a LoRA adapter; here with the SFT step like the others, their own
# trainers and data end to end in tests/test_multitask_dpo.py and tests/test_rlhf.py.
TRAINED = [name for name in PRESETS if name not in OWN_FILES] + ["qlora-8bit", "p_tuning", "ia3-4bit"]
# Trained with gradient checkpointing, as their recipes do (prefix tuning refuses it, see below).
CHECKPOINTING = {"full", "qlora"}
_PROJECT = {}


def _config(case):
    """(adapter module, adapter config, model config) of a case, through the recipe as a user writes it."""
    if not _PROJECT:
        import tempfile

        _PROJECT["dir"] = write_project(Path(tempfile.mkdtemp()) / "p", "", rows=chat_rows(4))
    preset, overrides = CASES[case]
    if preset == "multitask":  # the mixture is data: the adapter is the lora preset's
        preset = "lora"
    recipe = load_recipe(_PROJECT["dir"], method=preset, overrides=overrides)
    return adapter_of(recipe), recipe.adapter, recipe.model


def _base(tiny_model_dir, model_cfg):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, **quantization.model_kwargs(model_cfg))


def _applied(tiny_model_dir, case):
    adapter, cfg, model_cfg = _config(case)
    torch.manual_seed(0)
    return adapter.apply(quantization.prepare(_base(tiny_model_dir, model_cfg), model_cfg), cfg)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _logits(model, tok):
    enc = tok.apply_chat_template([{"role": "user", "content": "How do I reset my password?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    with torch.no_grad():
        return model(**enc).logits.float()


def _trainer(model, tok, out_dir, gradient_checkpointing=False):
    from datasets import Dataset
    from trl import SFTConfig

    from mlflow_finetune_plugin.train.objectives.sft_trainer import FinetuneSFTTrainer
    from mlflow_finetune_plugin.train.trainers import checkpointing_argument

    args = SFTConfig(output_dir=str(out_dir), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                     report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, max_length=64,
                     **checkpointing_argument(gradient_checkpointing), dataloader_num_workers=0, seed=0,
                     bf16=False, fp16=False)  # fp32 on CPU, as train.py does; TRL would default to bf16
    # The plugin's trainer with its CPU loss path (the model's own loss, train.fused_lm_head: auto off CUDA).
    return FinetuneSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(chat_rows(4)),
                              processing_class=tok, fused_lm_head=False)


@pytest.fixture(scope="module", params=TRAINED)
def trained(request, tiny_model_dir, tok, tmp_path_factory):
    """Each case applied to the tiny model and trained 2 steps with the plugin's SFTTrainer (shared by the
    tests below)."""
    case = request.param
    model = _applied(tiny_model_dir, case)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(model, tok, tmp_path_factory.mktemp(case),
                       gradient_checkpointing=case in CHECKPOINTING)
    trainer.train()
    model = trainer.model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    # Taken now, before any save: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights in place at the
    # first inference forward and `state_dict()` unpacks them lossily, so a quantized model's logits shift a
    # little once it has been saved. Reloads are compared with the model as trained.
    return case, model, trainable, changed, _logits(model, tok)


def test_every_entry_point_and_adapter_has_a_row():
    assert set(PRESETS) - OWN_FILES <= set(CASES) and set(TRAINED) <= set(CASES)
    assert set(CASES) == set(TRAINABLE), "add the expected trainable parameters of the new case to TRAINABLE"
    assert list(PRESETS)[0] == "lora"
    assert {_config(case)[1].type for case in CASES} == set(ADAPTERS)  # every adapter is in the matrix
    assert {_config(case)[2].quantization for case in CASES} == {"none", "4bit", "8bit"}


def test_every_adapter_module_has_the_whole_interface():
    for name, module in ADAPTERS.items():
        for attribute in ("ARTIFACT", "peft_config", "apply", "vllm_compatible"):
            assert hasattr(module, attribute), f"adapters/{name}.py has no {attribute}"
        assert module.ARTIFACT in ("adapter", "full")
    # what an adapter cannot train with names real adapters, each with its reason
    for table in (NOT_PACKABLE, NOT_QUANTIZABLE):
        assert set(table) <= set(ADAPTERS) and all(table.values())
    assert set(ADAPTER_CONFIGS) == set(ADAPTERS)


@pytest.mark.parametrize("case", list(CASES))
def test_applies_runs_and_only_intended_params_train(case, tiny_model_dir, tok):
    model = _applied(tiny_model_dir, case)
    logits = _logits(model, tok)
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()

    pattern, count = TRAINABLE[case]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == count, trainable
    assert all(re.fullmatch(pattern, n) for n in trainable), [n for n in trainable
                                                              if not re.fullmatch(pattern, n)]
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    if CASES[case][0] == "full":
        assert n_trainable == n_total
    else:
        assert 0 < n_trainable < n_total


def test_a_trainer_step_changes_only_trainable_params(trained, tiny_model_dir, tok):
    case, model, trainable, changed, tuned = trained
    assert changed == trainable
    # And the trained parameters are wired in: the output is no longer the base model's.
    base = _logits(_base(tiny_model_dir, _config(case)[2]), tok)
    tuned = tuned[:, -base.shape[1]:]  # prompt methods' logits include the virtual tokens
    assert not torch.allclose(tuned, base, atol=1e-4)


def test_save_and_reload_give_the_same_logits(trained, tiny_model_dir, tok, tmp_path):
    case, model, _, _, expected = trained
    method, cfg, model_cfg = _config(case)
    model.save_pretrained(tmp_path / "saved", safe_serialization=True)
    if method.ARTIFACT == "full":
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    else:
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(_base(tiny_model_dir, model_cfg), tmp_path / "saved")
        # TRL trains QLoRA adapters in bf16 and PEFT loads them into fp32 parameters: compute in the trained
        # dtype.
        dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
        for name, param in reloaded.named_parameters():
            if name in dtypes:
                param.data = param.data.to(dtypes[name])
    assert torch.allclose(_logits(reloaded.eval(), tok), expected, atol=1e-5)


def test_logged_model_reloads_and_registers(trained, tiny_model_dir, tok, tracking_uri):
    case, model, _, _, expected = trained
    method, cfg, model_cfg = _config(case)
    with mlflow.start_run():
        info = log_finetuned_model(model, tok, {"base_model": TINY_MODEL_REF, "artifact": method.ARTIFACT,
                                                "method": CASES[case][0]})
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    loaded = load_logged_model(local)
    if method.ARTIFACT == "adapter":
        assert not (local / "artifacts" / "model").exists() and not list(local.rglob("model.safetensors"))
    got = _logits(loaded.model, loaded.tokenizer)
    if model_cfg.quantization == "none":
        assert torch.allclose(got, expected, atol=1e-5)
    else:
        # Served on the full-precision base: off from training time by the base's quantization error, no more.
        fp_base = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok)
        quant_base = _logits(_base(tiny_model_dir, model_cfg), tok)
        quant_error = (fp_base - quant_base).abs()
        error = (got - expected).abs()
        assert error.max() <= 1.5 * quant_error.max() and error.mean() <= 1.5 * quant_error.mean()
        # The adapter does on the full-precision base what it did on the quantized one (LoRA at lr 1e-2 moves
        # the logits well past the 4-bit error in 2 steps; IA3's 2-step change is below it on the tiny model).
        if cfg.type == "lora":
            assert error.mean() < (fp_base - expected).abs().mean() / 2
        again = load_logged_model(local)
        assert torch.equal(_logits(again.model, again.tokenizer), got)  # and exactly reproducible
    version = mlflow.register_model(info.model_uri, f"tiny-{case}")
    assert int(version.version) == 1


@pytest.mark.parametrize("case, ok, because", [
    ("lora", True, "LoRA"),
    ("lora-dora-rslora", False, "DoRA"),
    ("qlora", True, "LoRA"),
    ("adapter", False, "merge"),
    ("ia3", False, "merge"),
    ("prefix", False, "cannot be merged"),
    ("prompt", False, "cannot be merged"),
    ("p_tuning", False, "cannot be merged"),
    ("full", True, "plain model folder"),
    ("multitask", True, "LoRA"),
    ("dpo", True, "LoRA"),
])
def test_vllm_compatibility_follows_vllms_documented_limits(case, ok, because, tiny_model_dir, tok):
    method, cfg, _ = _config(case)
    answer, reason = method.vllm_compatible(cfg)
    assert answer is ok and because in reason
    if "merge" in reason and "cannot" not in reason:
        # The advice holds: merging gives one plain model with the adapter's outputs.
        model = _applied(tiny_model_dir, case).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        expected = _logits(model, tok)
        assert torch.allclose(_logits(model.merge_and_unload(), tok), expected, atol=1e-4)


def test_lora_ranks_and_biases_vllm_refuses():
    assert lora.vllm_compatible(LoraAdapter(r=4))[0] is True  # any rank up to vLLM's largest max_lora_rank
    assert lora.vllm_compatible(LoraAdapter(r=1024))[0] is False
    assert lora.vllm_compatible(LoraAdapter(bias="all"))[0] is False
    method, cfg, _ = _config("qlora")
    assert method.vllm_compatible(cfg.model_copy(update={"r": 12}))[0] is True


def test_prefix_tuning_refuses_gradient_checkpointing(tiny_model_dir, tok, tmp_path):
    trainer = _trainer(_applied(tiny_model_dir, "prefix"), tok, tmp_path, gradient_checkpointing=True)
    with pytest.raises(FinetuneError, match="train.gradient_checkpointing: false"):
        trainer.train()


def test_config_errors_say_how_to_fix_them():
    with pytest.raises(ValueError, match="init_text"):
        PromptAdapter(init="text")
    with pytest.raises(ValueError, match="kind: prompt_tuning"):
        PromptAdapter(kind="p_tuning", init="text", init_text="hi")
    with pytest.raises(ValueError, match="not in target_modules"):
        IA3Adapter(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(FinetuneError, match="not quantized"):
        quantization.prepare(torch.nn.Linear(2, 2), ModelConfig(quantization="4bit"))


def test_each_method_has_a_recipe_and_a_docs_row():
    from mlflow_finetune_plugin.config.loading import load_recipe

    docs = (REPO / "docs" / "methods.md").read_text()
    for name in PRESETS:
        assert re.search(rf"^\| `{name}` \|", docs, re.M), f"docs/methods.md has no table row for `{name}`"
        if name != "lora":  # lora's recipe is the support-bot example
            recipe = load_recipe(REPO / "recipes" / name)
            assert recipe.method == name and recipe.model.name in (None, "smollm2")
    for kind in ADAPTERS:
        # support-bot packs its rows, which prefix and prompt tuning refuse
        config = load_recipe(REPO / "recipes" / "support-bot",
                             overrides={"adapter.type": kind, "data.packing": "auto"}).adapter
        for field in type(config).model_fields:
            assert f"`adapter.{field}`" in docs or field == "type", ("docs/methods.md does not document "
                                                                     f"adapter.{field} ({kind})")


def test_lora_on_the_top_layers_only(tiny_model_dir):
    """`lora.layers: N` adapts the top N decoder layers, every linear layer of each ('all-linear'), and
    nothing below; more layers than the model has is an error naming the key."""
    model = lora.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraAdapter(layers=2))
    adapted = {name.split(".layers.")[1].split(".lora_A")[0] for name,
               _ in model.named_parameters() if "lora_A" in name}
    assert adapted == {f"{i}.{m}" for i in (2, 3) for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                            "self_attn.v_proj", "self_attn.o_proj",
                                                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    with pytest.raises(FinetuneError, match="lora.layers: 5 is more than the model's 4 layers"):
        lora.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraAdapter(layers=5))
