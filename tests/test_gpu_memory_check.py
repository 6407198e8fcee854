"""bench/gpu/memory_plan_check.py (the memory plan against a GPU's measured peak on the published 8B
configurations) run for real as its CPU smoke test: the same code, each configuration cut to 2 small layers,
rows of 128 tokens, both methods (LoRA on a full-precision base built in memory, QLoRA through
`from_pretrained` with a state dict and bitsandbytes), the planned batch and one more row, each through the
plugin's SFT trainer; and bench/gpu/train_throughput.py's `--config` building a published configuration's
model with random weights. Nothing here measures a GPU: the figures on CPU are not the plan's check."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


@pytest.mark.stress  # ~45 s: a bench script's smoke run, before a device session (`-m stress`)
def test_the_gpu_memory_check_runs_end_to_end_on_cpu(tmp_path):
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu" / "memory_plan_check.py"), "--tiny", "--models",
         "llama-3.1-8b", "--seqs", "128", "--checkpointing", "on", "--workdir", str(tmp_path / "work"),
         "--out", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["run"]) for r in rows) == [
        ("lora", "one more"), ("lora", "planned"), ("qlora", "one more"), ("qlora", "planned")]
    for row in rows:
        assert "error" not in row, row
        # 512 tokens a step at most: 4 rows of 128 planned, then 5
        assert row["batch"] == (4 if row["run"] == "planned" else 5), row
        assert row["steps"] == 2 and row["measured_gib"] > 0 and row["planned_gib"] > 0, row
        assert row["plan_choice"] == "4 x 128" and row["check"] == "n/a on CPU (no cap)"
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| llama-3.1-8b qlora 128 ckpt |" in table and "| llama-3.1-8b lora 128 ckpt |" in table


def test_the_throughput_bench_builds_a_published_configuration(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench" / "gpu"))
    throughput = importlib.import_module("train_throughput")
    config = json.loads((REPO / "tests" / "fixtures" / "qwen3-8b" / "config.json").read_text())
    small = tmp_path / "qwen3-small" / "config.json"
    small.parent.mkdir()
    small.write_text(json.dumps({**config, "num_hidden_layers": 1, "hidden_size": 64,
                                 "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
                                 "head_dim": 32, "vocab_size": 4096}))
    folder = throughput.build_model(tmp_path / "models", small)
    built = json.loads((folder / "config.json").read_text())
    assert folder.name == "qwen3-small-bf16" and built["model_type"] == "qwen3"
    assert built["hidden_size"] == 64 and built["vocab_size"] == 4096 and not built["tie_word_embeddings"]
    assert (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()
    assert throughput.count_params(folder) > 2 * 4096 * 64  # both embeddings and the layer
