"""The training benchmark's measuring code: the per-step probe (bench/_probe) in a real Trainer process.

Benchmarks run by hand, but the probe decides what docs/benchmarks.md reports for every side, so a change in
transformers' callback order or Trainer.train must fail here rather than silently skew the figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import PROBE_DIR  # noqa: E402
from bench.train_throughput import step_figures  # noqa: E402


def _plain_train(tmp_path, tiny_model_dir, name, steps, extra_env, batch_size=2, logging_steps=1):
    """bench/plain_train.py with the probes on PYTHONPATH, logging steps to tmp_path/NAME.jsonl."""
    env = {**os.environ, "PYTHONPATH": f"{PROBE_DIR}:{REPO}", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": "1", "BENCH_STEP_LOG": str(tmp_path / f"{name}.jsonl"), **extra_env}
    cmd = [sys.executable, str(REPO / "bench" / "plain_train.py"), "--model", str(tiny_model_dir),
           "--data", str(REPO / "recipes" / "support-bot" / "data" / "train.jsonl"), "--max-length", "64",
           "--batch-size", str(batch_size), "--steps", str(steps), "--logging-steps", str(logging_steps),
           "--output-dir", str(tmp_path / f"{name}-out")]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_step_probe_times_every_step_of_a_real_trainer(tmp_path, tiny_model_dir):
    step_log = tmp_path / "steps.jsonl"
    proc = _plain_train(tmp_path, tiny_model_dir, "steps", 4, {}, batch_size=4, logging_steps=2)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])

    record = json.loads(step_log.read_text().splitlines()[-1])
    steps = record["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert record["runtime"] == result["seconds"]
    assert record["barrier_wait_s"] is None  # no $BENCH_TRAIN_BARRIER: train() starts at once
    for s in steps:
        assert s["end"] > s["begin"] and s["user"] + s["sys"] > 0 and s["faults"] >= 0
    # Training logs on step 1 (logging_first_step) and every 2 steps: the probe marks the end of those logs.
    assert [s["log"] is not None for s in steps] == [True, True, False, True]
    assert all(s["log"] >= s["end"] for s in steps if s["log"] is not None)
    # The token counter grows every step and ends at what the script reports.
    tokens = [s["tokens"] for s in steps]
    assert all(b > a for a, b in zip(tokens, tokens[1:])) and tokens[-1] == result["tokens"]

    figures = step_figures(step_log)
    seconds_after_1 = steps[-1]["log"] - steps[1]["begin"]
    assert figures["after1_tokens_per_s"] == (tokens[-1] - tokens[0]) / seconds_after_1
    assert figures["step1_s"] == steps[0]["end"] - steps[0]["begin"]


def test_step_probe_is_off_without_its_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "BENCH_STEP_LOG"}
    env["PYTHONPATH"] = str(PROBE_DIR)
    code = "import sys, transformers.trainer as t; print(t.Trainer.train.__module__)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "transformers.trainer"  # not wrapped by the probe


def test_barrier_starts_paired_training_loops_together(tmp_path, tiny_model_dir):
    """The paired scenario's barrier: two processes started 6 s apart begin step 1 together, the early one having
    waited for the late one, and overlap_figures measures both over the steps they ran side by side."""
    import time

    from bench.train_throughput import overlap_figures

    barrier = {"BENCH_TRAIN_BARRIER": str(tmp_path / "barrier"), "BENCH_TRAIN_PARTIES": "2"}
    # 40 steps (a few seconds): a run of 8 tiny steps took well under a second, so the jitter of two processes'
    # starts after the barrier could leave fewer than 2 steps run side by side (seen once in CI).
    early = _plain_train(tmp_path, tiny_model_dir, "early", 40, barrier)
    time.sleep(6)
    late = _plain_train(tmp_path, tiny_model_dir, "late", 40, barrier)
    for proc in (early, late):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    records = {n: json.loads((tmp_path / f"{n}.jsonl").read_text().splitlines()[-1]) for n in ("early", "late")}
    assert records["early"]["barrier_wait_s"] > records["late"]["barrier_wait_s"] + 3
    begins = [r["steps"][0]["begin"] for r in records.values()]  # one system-wide clock in both processes
    assert abs(begins[0] - begins[1]) < 2.5, begins

    figures = overlap_figures({n: tmp_path / f"{n}.jsonl" for n in records})
    t0 = max(r["steps"][1]["begin"] for r in records.values())
    t1 = min(r["steps"][-1]["log"] for r in records.values())
    for name, fig in figures.items():
        inside = [s for s in records[name]["steps"][1:] if s["begin"] >= t0 and s["log"] <= t1]
        assert fig["overlap_steps"] == len(inside) >= 2
        assert fig["overlap_s"] == t1 - t0
        before = records[name]["steps"][records[name]["steps"].index(inside[0]) - 1]
        assert fig["after1_tokens_per_s"] == (inside[-1]["tokens"] - before["tokens"]) / (
            inside[-1]["log"] - inside[0]["begin"])

