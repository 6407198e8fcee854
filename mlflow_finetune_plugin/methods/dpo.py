"""DPO: preference tuning (prompt, chosen, rejected) with TRL's DPOTrainer, training a LoRA adapter.

The adapter starts fresh on the base (`init_adapter` empty: the reference model is the base, the adapter disabled)
or from an existing LoRA adapter, e.g. the SFT version being improved (`init_adapter: models:/support-bot@champion`:
that adapter keeps training and a frozen copy of it is the reference, as TRL does for a pretrained adapter).
The result is an ordinary LoRA adapter on the same base, logged and registered like `lora`'s.
Evaluation adds, to the answers scored against the chosen ones, how much more likely the starting and the tuned
policy make the chosen answer than the rejected one on the held-out pairs (`preference_eval.py`).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.methods import lora

ARTIFACT = "adapter"
DATA_FORMATS = ("preference",)


class Config(lora.Config):
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model (KL weight).")
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero",
                       "apo_down", "exo_pair", "discopop"] = Field("sigmoid", description="TRL's DPO loss variant.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed share of flipped labels (cDPO, robust).")
    init_adapter: str | None = Field(
        None, description="Start from this LoRA adapter (models:/NAME@ALIAS, models:/NAME/N, runs:/ID/model, or an "
                          "adapter folder) instead of a fresh one; it is also the frozen reference.")


def model_kwargs(cfg: Config) -> dict:
    return {}


def apply(model, cfg: Config):
    from peft import PeftModel, get_peft_model

    if not cfg.init_adapter:
        return get_peft_model(model, lora.peft_config(cfg))
    adapter_dir = resolve_adapter(cfg.init_adapter)
    print(f"DPO starts from the adapter {cfg.init_adapter}", file=sys.stderr)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


def resolve_adapter(ref: str) -> Path:
    """A local PEFT adapter folder for `ref`: an MLflow model URI of a logged LoRA model, or a folder."""
    import json

    local = Path(ref).expanduser()
    if not local.exists():
        import mlflow

        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))
        except Exception as e:  # noqa: BLE001 - MLflow raises several types for a bad URI
            raise FinetuneError(f"dpo.init_adapter: cannot resolve {ref!r} ({e}). Give a registered model "
                                "(models:/NAME@ALIAS or models:/NAME/VERSION) or an adapter folder") from None
    folder = local / "artifacts" / "adapter" if (local / "artifacts" / "adapter").is_dir() else local
    config = folder / "adapter_config.json"
    if not config.exists():
        raise FinetuneError(f"dpo.init_adapter: {ref!r} is not a LoRA adapter (no adapter_config.json in {folder}); "
                            "full fine-tunes cannot be continued with DPO here, start from the base instead")
    if json.loads(config.read_text()).get("peft_type") != "LORA":
        raise FinetuneError(f"dpo.init_adapter: {ref!r} is not a LoRA adapter; DPO continues LoRA adapters only")
    return folder


def build_trainer(recipe, model, tokenizer, train_ds, eval_ds, args: dict):
    """TRL's DPOTrainer; the reference is the base (fresh adapter) or a frozen copy of `init_adapter`."""
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from mlflow_finetune_plugin.callbacks import CheckpointLogger, MlflowMetrics

    cfg = recipe.dpo
    config = DPOConfig(**args, beta=cfg.beta, loss_type=[cfg.loss_type], label_smoothing=cfg.label_smoothing,
                       max_length=recipe.data.max_length)

    class _DropReferenceAdapter(TrainerCallback):
        """TRL adds a frozen `ref` adapter when it continues a pretrained one; the logged model is `default` only."""

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if model is not None and "ref" in getattr(model, "peft_config", {}):
                model.set_adapter("default")
                model.delete_adapter("ref")

    return DPOTrainer(model=model, ref_model=None, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=tokenizer,
                      callbacks=[MlflowMetrics(), CheckpointLogger(), _DropReferenceAdapter()])


def evaluate(recipe, method, model, tokenizer, train_ds, eval_ds) -> None:
    """The usual evaluation (base, few-shot and tuned answers against the chosen ones), then the chosen-over-rejected
    log-prob margin and accuracy of the starting and the tuned policy on every held-out pair."""
    import mlflow

    from mlflow_finetune_plugin.evaluation import (
        comparison_table,
        conversations,
        log_evaluation,
        run_evaluation,
    )
    from mlflow_finetune_plugin.preference_eval import (
        preference_margins,
        preference_metrics,
        preference_table,
    )

    result = run_evaluation(model, tokenizer, conversations(eval_ds), conversations(train_ds), recipe.eval)
    log_evaluation(result)
    print(comparison_table(result.metrics))

    pairs = [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in eval_ds]

    def margins():  # batches of train.batch_size pairs, as TRL's own evaluation runs them
        return preference_margins(model, tokenizer, pairs, recipe.data.max_length, recipe.train.batch_size)

    with _starting_policy(model, recipe.dpo):
        start = margins()
    tuned = margins()
    if not tuned:
        print("Preference evaluation: no held-out pair fits data.max_length; nothing scored.", file=sys.stderr)
        return
    metrics = {**preference_metrics(start, "start"), **preference_metrics(tuned, "tuned")}
    mlflow.log_metrics({**metrics, "eval/n_pairs": float(len(tuned))})
    print(f"\nHeld-out preference pairs ({len(tuned)}): log p(chosen) - log p(rejected)")
    print(preference_table(metrics))


@contextlib.contextmanager
def _starting_policy(model, cfg: Config):
    """The policy DPO started from: the base (a fresh adapter disabled), or the `init_adapter` weights loaded again
    beside the tuned adapter (TRL's frozen `ref` copy of them is deleted when training ends, before evaluation)."""
    if not cfg.init_adapter:
        with model.disable_adapter():
            yield
        return
    tuned = model.active_adapter
    model.load_adapter(str(resolve_adapter(cfg.init_adapter)), adapter_name="start")
    model.set_adapter("start", inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(tuned)
        model.delete_adapter("start")


def vllm_compatible(cfg: Config) -> tuple[bool, str]:
    return lora.vllm_compatible(cfg)
