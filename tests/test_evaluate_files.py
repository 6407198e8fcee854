"""`mlflow-finetune evaluate --data FILE` reads what training reads: CSV and parquet as well as JSONL, through
the same reader (columns parsed, every format)."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.evaluate.contenders import read_conversations
from mlflow_finetune_plugin.logged_model import log_finetuned_model
from mlflow_finetune_plugin.models.tiny import TINY_MODEL_REF

ROWS = [{"prompt": f"What is {i} plus {i}?", "completion": f"{i} plus {i} is {2 * i}."} for i in range(3)]
CHATS = [{"messages": [{"role": "user", "content": r["prompt"]},
                       {"role": "assistant", "content": r["completion"]}]} for r in ROWS]


@pytest.fixture
def logged_model_uri(tracking_uri, tiny_model_dir):
    """A LoRA on the tiny model, logged as mlflow-finetune logs a fine-tune; its URI."""
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    with mlflow.start_run():
        info = log_finetuned_model(model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir),
                                   {"base_model": TINY_MODEL_REF, "artifact": "adapter", "method": "lora"})
    return info.model_uri


def _write(tmp_path, kind: str):
    """The same three examples as prompt/completion CSV, chat parquet (message lists as Arrow lists) and
    JSONL."""
    path = tmp_path / f"eval.{kind}"
    if kind == "csv":
        pd.DataFrame(ROWS).to_csv(path, index=False)
    elif kind == "parquet":
        pd.DataFrame(CHATS).to_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    return path


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_evaluate_reads_csv_and_parquet(tmp_path, logged_model_uri, kind):
    path = _write(tmp_path, kind)
    assert read_conversations(str(path)) == read_conversations(str(_write(tmp_path, "jsonl")))

    result = CliRunner().invoke(main, ["evaluate", logged_model_uri, "--data", str(path), "--max-examples",
                                       "2", "--max-new-tokens", "4", "--fewshot-k", "0"])
    assert result.exit_code == 0, result.output
    run_id = result.output.strip().split("Logged to run ")[1].split()[0]
    metrics = mlflow.MlflowClient().get_run(run_id).data.metrics
    assert metrics["eval/n_examples"] == 2
    assert {"eval/tuned/rougeL", "eval/base/rougeL", "eval/tuned/loss"} <= set(metrics)
