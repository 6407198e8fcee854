"""A trained reward model as an MLflow model: (prompt, answer) pairs in, one score each out.

Layout, as for a chat model (`logged_model.py`): `adapter/` (a PEFT sequence-classification adapter whose
folder also holds the trained score head) or `model/` (a full fine-tune's complete weights) and `tokenizer/`,
with the base referenced in `model_config`, never copied. It carries its code and lists PyPI requirements the
same way.

A pair is scored as TRL's RewardTrainer trained on it: the prompt's messages and the answer as the assistant's
turn, rendered with the model's own chat template; the score is the head's output at the last token. The same
function scores held-out pairs after training (`train/objectives/reward.py`) and GRPO completions
(`train/rewards/learned.py`), each with the reward model's own tokenizer, whatever the policy's base is.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.logged_model import (
    load_full_model,
    load_logged_base,
    requirements,
    saved_artifacts,
    stage_code,
)

MODEL_CODE = Path(__file__).with_name("reward_scorer.py")


@dataclass
class LoadedReward:
    model: Any          # PeftModel over the base under a score head, or a full sequence-classification model
    tokenizer: Any
    config: dict


def conversation(prompt, answer) -> list[dict]:
    """A prompt (text or messages) and an answer (text or an assistant message list) as one chat."""
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    answer = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else [dict(m)
                                                                                         for m in answer]
    return prompt + answer


def score(model, tokenizer, prompts: list, answers: list, batch_size: int = 8) -> list[float]:
    """The reward of each (prompt, answer) pair, in batches, right-padded as TRL's RewardTrainer pads them."""
    import torch

    from mlflow_finetune_plugin.models.chat_format import prepared

    ids = [list(tokenizer.apply_chat_template(prepared(tokenizer, conversation(p, a)), tokenize=True,
                                              return_dict=True)["input_ids"]) for p,
           a in zip(prompts, answers)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                batch = tokenizer.pad({"input_ids": ids[start:start + batch_size]}, padding_side="right",
                                      return_tensors="pt")
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
                out += logits[:, 0].float().tolist()
    finally:
        model.train(was_training)
    return out


def load_reward(artifacts: dict[str, Path], config: dict, device: str | None = None) -> LoadedReward:
    import torch
    from transformers import AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(artifacts["tokenizer"])
    if config.get("artifact") == "full":
        model = load_full_model(artifacts["model"], None, scoring=True)
    else:
        from mlflow_finetune_plugin.models.peft_targets import load_adapter

        model = load_adapter(load_logged_base(config, torch.float32, scoring=True), artifacts["adapter"])
    # The head pools at the last token that is not padding: the model must know the tokenizer's pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    if hasattr(model, "get_base_model"):
        model.get_base_model().config.pad_token_id = tokenizer.pad_token_id
    return LoadedReward(model.to(device).eval(), tokenizer, config)


def load_registered_reward(uri: str) -> LoadedReward:
    """Download a logged reward model (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, `runs:/...`) and load
    it."""
    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    pyfunc = Model.load(str(local / "MLmodel")).flavors.get("python_function", {})
    config = dict(pyfunc.get("config") or {})
    if config.get("objective") != "reward":
        raise FinetuneError(
            f"{uri} is not a reward model (objective {config.get('objective')!r}); train one with "
            "`mlflow run DIR -e reward --backend finetune` on preference pairs")
    artifacts = {k: local / spec["path"] for k, spec in (pyfunc.get("artifacts") or {}).items()}
    return load_reward(artifacts, config)


class RewardScorer(mlflow.pyfunc.PythonModel):
    """pyfunc: a DataFrame with `prompt` (text or messages) and `answer` (text) columns in, one score per row
    out."""

    def load_context(self, context):
        self._loaded = load_reward({k: Path(v) for k, v in context.artifacts.items()},
                                   dict(context.model_config))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        missing = {"prompt", "answer"} - set(model_input.columns)
        if missing:
            raise FinetuneError(f"a reward model scores rows with `prompt` and `answer` columns; missing: "
                                f"{', '.join(sorted(missing))}")
        loaded = self._loaded
        return score(loaded.model, loaded.tokenizer, list(model_input["prompt"]), list(model_input["answer"]))


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "answer")]),
                          outputs=Schema([ColSpec("double")]))


def log_reward_model(model, tokenizer, config: dict, name: str = "model", tags: dict | None = None):
    """Log a trained reward model in the active run; returns MLflow's ModelInfo (`config` as for a chat model:
    `base_model`, `artifact`, `objective: reward`)."""
    with tempfile.TemporaryDirectory() as tmp:
        config, artifacts = saved_artifacts(model, tokenizer, config, Path(tmp))
        example = pd.DataFrame({"prompt": ["How do I reset my password?"], "answer": ["Use the reset link."]})
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(MODEL_CODE), artifacts=artifacts,
            code_paths=[str(stage_code(Path(tmp) / "code", __name__))],
            model_config={k: v for k, v in config.items() if v is not None},
            signature=_signature(), input_example=example, pip_requirements=requirements(config), tags=tags)
