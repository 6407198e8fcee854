"""The memory plan (`mlflow-finetune plan`, memory/): parameters counted from a configuration alone (the
published Llama-3.1-8B config.json, committed under tests/fixtures, nothing downloaded), what trains and what
AdamW keeps for it, the parts of the peak, the setting that fits a memory size, and bad input. The plan
against measured memory on CPU: tests/test_memory_measured.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.config.schema import Recipe
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.memory import plan as plans
from mlflow_finetune_plugin.memory.plan import check_fits, plan
from mlflow_finetune_plugin.memory.sizes import gpu_memory, parse_size
from tests.helpers import chat_rows, write_project

LLAMA_8B = Path(__file__).parent / "fixtures" / "llama-3.1-8b-instruct"
CFG = json.loads((LLAMA_8B / "config.json").read_text())


def _recipe(**sections) -> Recipe:
    sections.setdefault("model", {})
    sections["model"] = {"name": str(LLAMA_8B), **sections["model"]}
    return Recipe.model_validate(sections)


def _expected_counts():
    """Llama-3.1-8B's parameters and a rank-16 all-linear LoRA's, from the config's numbers."""
    h, i, v, n = CFG["hidden_size"], CFG["intermediate_size"], CFG["vocab_size"], CFG["num_hidden_layers"]
    kv = h // CFG["num_attention_heads"] * CFG["num_key_value_heads"]
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down: (in, out)
    layer = sum(a * b for a, b in linears) + 2 * h  # and two RMSNorm weights
    total = 2 * v * h + n * layer + h  # embedding, untied head, final norm
    lora = n * sum(16 * (a + b) for a, b in linears)
    return total, lora, n * sum(a * b for a, b in linears)


def test_parameters_counted_from_the_config_alone():
    total, lora, linear = _expected_counts()
    result = plan(_recipe(), device="cuda")
    assert result.params == total
    assert result.trainable == lora
    # bf16 weights on a GPU, the adapter in fp32 with its gradient, AdamW's two states for the adapter only
    assert result.parts["weights"] == 2 * total
    assert result.parts["adapter"] == result.parts["gradients"] == 4 * lora
    assert result.parts["optimizer (AdamW)"] == 8 * lora
    full = plan(_recipe(adapter={"type": "full"}), device="cuda")
    assert full.trainable == total
    assert full.parts["optimizer (AdamW)"] == 2 * 2 * total  # bf16 parameters: bf16 states
    four = plan(_recipe(model={"quantization": "4bit", "double_quant": False}), device="cuda")
    # NF4: half a byte a weight and an fp32 absmax per 64 of the decoder's linear weights; the rest in fp32,
    # as PEFT's prepare_model_for_kbit_training leaves it
    assert four.parts["weights"] == int(linear * (0.5 + 4 / 64) + (total - linear) * 4)


@pytest.mark.parametrize("folder", ["qwen3-8b", "mistral-7b-instruct-v0.3"])
def test_the_published_qwen3_and_mistral_configurations_are_counted(folder):
    """The other two published configurations beside Llama's (tests/fixtures; bench/gpu/memory_plan_check.py
    measures all three on a GPU): parameters from the config's numbers, Qwen3's per-head q/k norms included
    (Qwen3-8B: 8.19B, Mistral-7B: 7.25B, as published)."""
    cfg = json.loads((LLAMA_8B.parent / folder / "config.json").read_text())
    h, i, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    linears = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    norms = 2 * h + (2 * d if cfg["model_type"] == "qwen3" else 0)
    result = plan(_recipe(model={"name": str(LLAMA_8B.parent / folder)}), device="cuda")
    assert result.params == 2 * v * h + n * (sum(a * b for a, b in linears) + norms) + h
    assert result.trainable == n * sum(16 * (a + b) for a, b in linears)
    assert round(result.params / 1e9, 2) == {"qwen3-8b": 8.19, "mistral-7b-instruct-v0.3": 7.25}[folder]


def test_a_folder_with_a_config_alone_is_planned_at_max_length(tmp_path):
    """transformers makes an empty tokenizer (one token) of a Qwen3 config alone: the rows are not counted
    with it (they came out at 12 tokens), the plan takes data.max_length."""
    qwen3 = LLAMA_8B.parent / "qwen3-8b"
    recipe = f"model:\n  name: {qwen3}\ndata:\n  max_length: 2048\n"
    project = write_project(tmp_path / "p", recipe, chat_rows(4))
    got = CliRunner().invoke(main, ["plan", str(project), "-e", "qlora", "--device", "cuda", "--json"])
    assert got.exit_code == 0, got.output
    data = json.loads(got.output[got.output.index("{"):])
    assert data["tokens"] == 2048 and data["longest_row"] is None
    assert data["rows_from"] == f"no tokenizer files in {qwen3}"


def test_activations_follow_the_tokens_and_checkpointing():
    one = plan(_recipe(data={"max_length": 2048}, train={"batch_size": 1}), device="cuda", longest=1024)
    two = plan(_recipe(data={"max_length": 2048}, train={"batch_size": 2}), device="cuda", longest=1024)
    long = plan(_recipe(data={"max_length": 2048}, train={"batch_size": 1}), device="cuda", longest=2048)
    ckpt = plan(_recipe(data={"max_length": 2048}, train={"batch_size": 1, "gradient_checkpointing": True}),
                device="cuda", longest=2048)
    assert one.tokens == 1024 and long.tokens == 2048
    assert two.parts["activations"] == pytest.approx(2 * one.parts["activations"], rel=0.01)
    assert long.parts["activations"] == pytest.approx(2 * one.parts["activations"], rel=0.01)
    # one hidden state per layer plus one layer: far below all the layers' activations
    assert ckpt.parts["activations"] < long.parts["activations"] / 5
    assert ckpt.per_token["checkpointing"] == CFG["num_hidden_layers"] * CFG["hidden_size"] * 2
    eager = plan(_recipe(model={"attn_implementation": "eager"}, data={"max_length": 2048},
                         train={"batch_size": 1}), device="cuda", longest=2048)
    assert eager.parts["activations"] > long.parts["activations"]  # the (tokens x tokens) scores kept


def test_the_fit_keeps_the_rows_per_update_and_refuses_naming_what_fits():
    recipe = _recipe(model={"quantization": "4bit"}, data={"max_length": 4096}, train={"batch_size": 16})
    result = plan(recipe, device="cuda", device_memory=24 * 2**30, longest=4096)
    assert not result.fits and result.choice is not None
    c = result.choice
    assert c.peak <= 24 * 2**30 and c.batch_size * c.grad_accum == 16
    with pytest.raises(FinetuneError, match=rf"train.batch_size={c.batch_size} .*grad_accum={c.grad_accum}"):
        check_fits(result)
    roomy = plan(recipe, device="cuda", device_memory=gpu_memory("H200"), longest=512)
    assert roomy.fits and roomy.choice is not None
    check_fits(roomy)  # fits: nothing raised


def test_too_large_even_at_batch_one_says_the_least_memory():
    result = plan(_recipe(adapter={"type": "full"}), device="cuda", device_memory=8 * 2**30)
    assert result.choice is None and result.needs > 8 * 2**30
    with pytest.raises(FinetuneError, match=r"even at batch 1 .* needs at least \d+\.\d\d GiB"):
        check_fits(result)


@pytest.mark.parametrize("text, size", [("24GiB", 24 * 2**30), ("24 GiB", 24 * 2**30), ("24gib", 24 * 2**30),
                                        ("24G", 24 * 2**30), ("80GB", 80 * 10**9), ("24 gb", 24 * 10**9),
                                        ("40960MiB", 40 * 2**30), ("1.5TiB", int(1.5 * 2**40))])
def test_memory_sizes_in_the_forms_users_write(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["abc", "24", "24 parsecs", "0GiB", ""])
def test_a_memory_size_in_another_form_shows_the_form(text):
    with pytest.raises(FinetuneError, match=r"--memory .* give a number and a unit: 24GiB, 80GB"):
        parse_size(text)


def test_cards_by_name():
    assert gpu_memory("a100-80gb") == gpu_memory("A100 80GB") > gpu_memory("RTX4090")
    with pytest.raises(FinetuneError, match="Did you mean A100-80GB"):
        gpu_memory("A100-80")


def test_an_unreadable_configuration_says_why(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FinetuneError, match=r"configuration could not be read .*config\.json"):
        plan(_recipe(model={"name": str(tmp_path)}), device="cuda")


def test_the_command_prints_the_parts_and_json(tmp_path):
    project = write_project(tmp_path / "p", f"model:\n  name: {LLAMA_8B}\n", chat_rows(4))
    runner = CliRunner()
    got = runner.invoke(main, ["plan", str(project), "-e", "qlora", "--gpu", "RTX4090",
                               "-P", "train.batch_size=4"])
    assert got.exit_code == 0, got.output
    for part in ("weights", "adapter", "gradients", "optimizer (AdamW)", "activations", "logits", "overhead",
                 "peak", "Fits 23.99 GiB"):
        assert part in got.output
    got = runner.invoke(main, ["plan", str(project), "-e", "lora", "--memory", "80GB", "--json"])
    data = json.loads(got.output[got.output.index("{"):])
    parts = data["parts"]
    assert data["device"] == "cpu" and data["peak"] == data["setting"]["peak"]
    # the backward pass holds the larger of (activations + logits) and the gradients, not both; on a CPU the
    # allocator's share comes on top of all but the process's own baseline
    held = sum(parts.values()) - min(parts["gradients"], parts["activations"] + parts["logits"])
    grown = held - parts["overhead"]
    assert data["peak"] == parts["overhead"] + int(grown * (1 + plans.CPU_ALLOCATOR_SLACK))
    assert data["memory"] == 80 * 10**9 and data["choice"]["batch_size"] >= 1
    bad = runner.invoke(main, ["plan", str(project), "--memory", "24"])
    assert bad.exit_code == 1 and "give a number and a unit" in bad.output


def test_the_cpu_plan_counts_the_process_baseline():
    result = plan(Recipe.model_validate({"model": {"name": "tiny"}, "train": {"precision": "fp32"}}),
                  device="cpu")
    assert result.parts["overhead"] == plans._baseline_rss() or result.parts["overhead"] > 100 * 2**20
    assert result.peak >= result.parts["overhead"] + result.parts["weights"]


def test_auto_batch_and_checkpointing_take_the_plans_choice(capsys):
    from mlflow_finetune_plugin.memory.choose import run_tags, settle

    recipe = _recipe(model={"quantization": "4bit"}, data={"max_length": 2048},
                     train={"batch_size": "auto", "gradient_checkpointing": "auto", "grad_accum": 2})
    settled, planned = settle(recipe, device="cuda", memory=24 * 2**30)
    t = settled.train
    assert isinstance(t.batch_size, int) and isinstance(t.gradient_checkpointing, bool)
    assert t.batch_size * t.grad_accum == 16  # 8 rows per update x the recipe's grad_accum, kept
    assert planned.peak <= 24 * 2**30 and planned.setting.batch_size == t.batch_size
    assert "Memory plan: batch_size" in capsys.readouterr().err
    assert "finetune.memory_plan" in run_tags(planned)
    # a recipe without `auto` on a CPU is not planned at all (nothing to choose, nothing refused)
    plain = _recipe(train={"batch_size": 2})
    assert settle(plain, device="cpu", memory=2**30) == (plain, None)


def test_auto_is_refused_with_grpo_when_the_recipe_loads():
    from mlflow_finetune_plugin.config.checks import grpo_problems

    problems = grpo_problems(Recipe.model_validate({"objective": "grpo", "train": {"batch_size": "auto"}}))
    assert any("train.batch_size: auto is not taken with objective: grpo" in p for p in problems)


def test_the_backend_refuses_a_recipe_too_large_for_the_gpu_before_any_run(tmp_path, tracking_uri,
                                                                           monkeypatch):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import ExecutionException

    from mlflow_finetune_plugin.backend import FinetuneBackend
    from mlflow_finetune_plugin.memory import choose

    monkeypatch.setattr(choose, "this_device", lambda: ("cuda", 40 * 2**30))  # no GPU here: its size given
    project = write_project(tmp_path / "p", f"model:\n  name: {LLAMA_8B}\ndata:\n  max_length: 2048\n"
                                            "train:\n  batch_size: 16\n", chat_rows(8))
    exp = mlflow.set_experiment("plan-test").experiment_id
    with pytest.raises(ExecutionException, match=r"needs .* GiB on this 40.00 GiB device .*this fits: "
                                                 r"-P train.batch_size=\d+ -P train.grad_accum=\d+"):
        FinetuneBackend().run(str(project), "lora", {}, None, {"SYNCHRONOUS": True}, tracking_uri, exp)
    assert MlflowClient().search_runs([exp]) == []


def test_the_studio_check_shows_the_plan_and_the_gpu_refusal(tmp_path, monkeypatch):
    from mlflow_finetune_plugin.memory import choose
    from mlflow_finetune_plugin.studio.checks import check

    monkeypatch.setattr(choose, "this_device", lambda: ("cuda", 40 * 2**30))
    project = write_project(tmp_path / "p", f"model:\n  name: {LLAMA_8B}\ndata:\n  max_length: 2048\n"
                                            "train:\n  batch_size: 16\n", chat_rows(8))
    result = check(project, "lora", {})
    (problem,) = [p for p in result.problems if p.key == "train.batch_size"]
    assert "this fits: -P train.batch_size=" in problem.message and not result.ok
    assert "Memory plan of " in result.memory and "Fits 40.00 GiB: batch_size" in result.memory
    assert check(project, "lora", {"train.batch_size": "auto"}).ok  # auto takes what fits
