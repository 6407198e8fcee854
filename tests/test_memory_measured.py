"""The memory plan against measured memory on CPU: random models built from five families' published
configurations (fewer layers, 100M-400M parameters, so that weights and activations outweigh the libraries),
under LoRA and full fine-tuning, at two row lengths. The plan's growth (its peak without the process's own
baseline) against the measured growth: the training process's peak resident memory (VmHWM, as
`train/peak_rss_gib`) above its resident memory once torch, transformers, PEFT, TRL and MLflow are loaded
(tests/memory_worker.py, one process per model, fp32, batch 1, the loss over all the logits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlflow_finetune_plugin.config.schema import Recipe
from mlflow_finetune_plugin.memory.plan import plan

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
LENGTHS = (128, 256)
TOLERANCE = 0.15


def _configs():
    """The published configurations (hub config.json numbers), cut to a few decoder layers."""
    import transformers as t

    return {
        # HuggingFaceTB/SmolLM2-360M: 6 of its 32 layers
        "llama": t.LlamaConfig(hidden_size=960, intermediate_size=2560, num_attention_heads=15,
                               num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True,
                               rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                               num_hidden_layers=6),
        # Qwen/Qwen2.5-0.5B: 2 of 24
        "qwen2": t.Qwen2Config(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                               rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
                               num_hidden_layers=2),
        # Qwen/Qwen3-0.6B: 2 of 28
        "qwen3": t.Qwen3Config(hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                               num_key_value_heads=8, head_dim=128, vocab_size=151936,
                               tie_word_embeddings=True,
                               rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960,
                               num_hidden_layers=2),
        # google/gemma-3-270m: 4 of 18
        "gemma3": t.Gemma3TextConfig(hidden_size=640, intermediate_size=2048, num_attention_heads=4,
                                     num_key_value_heads=1, head_dim=256, vocab_size=262144,
                                     sliding_window=512, query_pre_attn_scalar=256,
                                     max_position_embeddings=32768, num_hidden_layers=4,
                                     layer_types=["sliding_attention"] * 4),
        # microsoft/Phi-3-mini-4k-instruct: 1 of 32
        "phi3": t.Phi3Config(hidden_size=3072, intermediate_size=8192, num_attention_heads=32,
                             num_key_value_heads=32, vocab_size=32064, tie_word_embeddings=False,
                             rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
                             num_hidden_layers=1),
    }


def _planned(folder: Path, method: str, tokens: int) -> int:
    recipe = Recipe.model_validate({
        "model": {"name": str(folder), "attn_implementation": "sdpa"}, "adapter": {"type": method},
        "data": {"max_length": tokens, "packing": False},
        "train": {"batch_size": 1, "precision": "fp32", "fused_lm_head": False}})
    return plan(recipe, device="cpu", longest=tokens, overhead=0).peak


# One family in the main suite (about 50 s of CPU); all five with `-m stress` (about 10 min on 2 shared cores:
# the main suite's time budget is near its end).
@pytest.mark.parametrize("family", ["llama", *(pytest.param(f, marks=pytest.mark.stress)
                                               for f in ("qwen2", "qwen3", "gemma3", "phi3"))])
def test_the_plan_is_within_15_percent_of_the_measured_growth(family, tmp_path):
    config = _configs()[family]
    config.save_pretrained(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    worker = [sys.executable, str(REPO / "tests" / "memory_worker.py"), str(tmp_path), "lora,full"]
    out = subprocess.run([*worker, *map(str, LENGTHS)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 * len(LENGTHS)
    report, off = [], []
    for row in rows:
        measured = row["peak"] - row["baseline"]
        planned = _planned(tmp_path, row["method"], row["tokens"])
        line = (f"{family} {row['method']} {row['tokens']} tokens: planned {planned / 2**30:.3f} GiB, "
                f"measured {measured / 2**30:.3f} GiB ({planned / measured - 1:+.1%})")
        report.append(line)
        if abs(planned / measured - 1) > TOLERANCE:
            off.append(line)
    print("\n".join(report))
    assert not off, "beyond 15%:\n" + "\n".join(off)
