"""`train.neftune_alpha`: NEFTune noise on the input embeddings while training, none outside it (tiny
model)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from mlflow_finetune_plugin.config.loading import load_recipe
from tests.helpers import chat_rows, jsonl


def _project(root: Path) -> Path:
    jsonl(root / "data" / "train.jsonl", chat_rows(8))
    (root / "finetune.yaml").write_text("data: {train: data/train.jsonl, max_length: 64, packing: false}\n"
                                        "train: {max_steps: 2, batch_size: 2, save_steps: 100}\n"
                                        "registry: {name: bot}\n")
    return root


class _EmbeddingProbe(TrainerCallback):
    """Embeds the same ids twice after each step (in training mode): equal without noise, different with
    it."""

    def __init__(self):
        self.same_twice = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        embeddings = model.get_input_embeddings()
        ids = torch.arange(10).unsqueeze(0)
        self.same_twice.append(torch.equal(embeddings(ids), embeddings(ids)))


def _probe(recipe) -> tuple[_EmbeddingProbe, torch.nn.Module]:
    from mlflow_finetune_plugin.data.splits import load_splits
    from mlflow_finetune_plugin.models.base import load_base_model, load_tokenizer
    from mlflow_finetune_plugin.train.objectives import sft
    from mlflow_finetune_plugin.train.trainers import training_arguments

    args = training_arguments(recipe, "neftune-test", None)
    assert args["neftune_noise_alpha"] == recipe.train.neftune_alpha
    probe = _EmbeddingProbe()
    data = load_splits(recipe)
    trainer = sft.build_trainer(recipe, load_base_model(recipe.model), load_tokenizer(None), data.train, None,
                                {**args, "save_strategy": "no"}, [probe])
    trainer.train()
    return probe, trainer.model


def test_neftune_noises_the_embeddings_while_training_only(tmp_path):
    root = _project(tmp_path)
    probe, model = _probe(load_recipe(root, overrides={"train.neftune_alpha": "5"}))
    assert probe.same_twice == [False, False]
    ids = torch.arange(10).unsqueeze(0)
    embeddings = model.get_input_embeddings()  # after training: the hook is gone, the logged model is plain
    assert torch.equal(embeddings(ids), embeddings(ids))

    plain, _ = _probe(load_recipe(root))
    assert plain.same_twice == [True, True]
