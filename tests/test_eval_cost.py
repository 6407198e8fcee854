"""What each contender's answers cost (prompt and answer tokens, seconds per answer, tokens per second,
parameters) beside their quality, in every run's evaluation; and the teacher as a contender where the held-out
rows carry its answers (`teacher`: rows written for distillation, rows made of traces), with the verdict's
sentence on whether the student can stand in for it. Real components on the tiny model; timings are only
checked to be positive."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.entities import SpanType
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.config.schema import EvalConfig, LoraAdapter
from mlflow_finetune_plugin.data.read import load_training_dataset
from mlflow_finetune_plugin.data.teacher import teachers
from mlflow_finetune_plugin.data.traces import query_of, read_traces
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.evaluate.contenders import run_evaluation
from mlflow_finetune_plugin.logged_model import log_finetuned_model
from mlflow_finetune_plugin.metrics import COST_METRICS, comparison_table
from mlflow_finetune_plugin.models.tiny import TINY_MODEL_REF
from mlflow_finetune_plugin.tags import VERDICT
from mlflow_finetune_plugin.train.adapters import lora
from tests.helpers import FAST_OVERRIDES, chat_rows, forget_active_experiment, subprocess_env, write_project

CONTENDERS = ("base", "fewshot", "retrieval", "tuned")


@pytest.fixture(scope="module")
def tiny_lora(tiny_model_dir):
    torch.manual_seed(0)
    model = lora.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                       LoraAdapter(r=8, alpha=16, dropout=0.0))
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def taught(rows: list[dict], expect: set[int] = frozenset()) -> list[dict]:
    """`rows` with a teacher's answer each; rows in `expect` keep their own answer as an expectation that
    replaced the teacher's (the teacher said something else)."""
    out = []
    for i, row in enumerate(rows):
        answer = row["messages"][-1]["content"]
        out.append({**row, "teacher": {"answer": f"I think {i}." if i in expect else answer,
                                       "model": "big-model", "prompt_tokens": 20 + i, "completion_tokens": 8,
                                       "latency_s": 0.5}})
    return out


def test_every_contender_has_cost_columns_and_retrieval_pays_in_prompt_tokens(tiny_lora):
    model, tok = tiny_lora
    cfg = EvalConfig(max_examples=4, max_new_tokens=6, fewshot_k=2, batch_size=3)
    result = run_evaluation(model, tok, [r["messages"] for r in chat_rows(4)],
                            [r["messages"] for r in chat_rows(6, offset=10)], cfg)
    m = result.metrics
    for c in CONTENDERS:
        for name in COST_METRICS:
            assert math.isfinite(m[f"eval/{c}/{name}"]) and m[f"eval/{c}/{name}"] >= 0, (c, name)
        assert m[f"eval/{c}/latency_s"] > 0 and m[f"eval/{c}/prompt_tokens"] > 0
    assert m["eval/retrieval/prompt_tokens"] > m["eval/base/prompt_tokens"] == m["eval/tuned/prompt_tokens"]
    assert m["eval/fewshot/prompt_tokens"] > m["eval/base/prompt_tokens"]
    everything = sum(p.numel() for p in model.parameters())
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert m["eval/tuned/params"] == everything and m["eval/base/params"] == everything - adapter
    assert m["eval/retrieval/params"] == m["eval/base/params"]
    assert "eval/teacher/rougeL" not in m and "teacher" not in result.contenders
    quality, _, costs = comparison_table(m).partition("\n\n")  # the cost rows under a blank line
    assert "rougeL" in quality and "latency_s" not in quality
    assert costs.split()[0] == "prompt_tokens" and "params" in costs


def test_teacher_rows_make_a_teacher_contender_scored_on_its_logged_answers(tiny_lora, tmp_path,
                                                                            tracking_uri):
    model, tok = tiny_lora
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in taught(chat_rows(12), expect={0, 3, 5, 7})))
    rows, _ = load_training_dataset(str(path))
    given = teachers(rows)
    assert given[1] == {"answer": "1 plus 1 is 2.", "model": "big-model", "prompt_tokens": 21,
                        "completion_tokens": 8, "latency_s": 0.5}
    cfg = EvalConfig(max_examples=12, max_new_tokens=6, fewshot_k=0, retrieval_k=0, teacher_params=10**9)
    result = run_evaluation(model, tok, [r["messages"] for r in chat_rows(12)], [], cfg, teachers=given)
    m = result.metrics
    assert result.contenders == ["teacher", "base", "tuned"]
    assert m["eval/teacher/prompt_tokens"] == pytest.approx(20 + 5.5) and m["eval/teacher/answer_tokens"] == 8
    assert m["eval/teacher/tokens_per_s"] == pytest.approx(16) and m["eval/teacher/params"] == 1e9
    assert "eval/teacher/loss" not in m  # logged answers have no log-probabilities here
    # 8 of 12 targets are the teacher's own answers: it agrees with itself there, not on the 4 expectations
    assert m["eval/n_expected"] == 4 and m["eval/teacher/expected_exact_match"] == 0.0
    assert m["eval/teacher/exact_match"] == pytest.approx(8 / 12)
    for c in ("base", "tuned"):
        assert 0 <= m[f"eval/{c}/teacher_rougeL"] <= 1 and 0 <= m[f"eval/{c}/expected_rougeL"] <= 1
    assert [r["teacher_expected"] for r in result.rows][:4] == [1.0, 0.0, 0.0, 1.0]

    from mlflow_finetune_plugin.evaluate.report import log_evaluation
    from mlflow_finetune_plugin.evaluate.verdict import conclude

    with mlflow.start_run() as run:
        log_evaluation(result)
    verdict = conclude(run.info.run_id)
    assert "Student vs teacher: the student keeps" in verdict.sentence()
    assert "against the expectations" in verdict.sentence() and "on 4 rows" in verdict.sentence()
    assert "too few to tell" in verdict.sentence()  # 4 rows: under the verdict's minimum
    assert "x the parameters" in verdict.sentence() and "x the tokens/s" in verdict.sentence()
    assert verdict.cost.startswith("Cost per answer on this machine:") and "tuned" in verdict.cost
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.tags[VERDICT] == verdict.sentence()


def test_a_teacher_on_some_rows_only_is_not_a_contender_and_bad_teacher_values_are_refused(tiny_lora,
                                                                                           tmp_path):
    model, tok = tiny_lora
    given = [r["teacher"] for r in taught(chat_rows(3))][:2] + [None]
    result = run_evaluation(model, tok, [r["messages"] for r in chat_rows(3)], [],
                            EvalConfig(max_examples=3, max_new_tokens=2, fewshot_k=0), teachers=given)
    assert "teacher" not in result.contenders
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({**chat_rows(1)[0], "teacher": {"answer": 3, "latency_s": "fast"}}) + "\n")
    with pytest.raises(FinetuneError) as err:
        load_training_dataset(str(path))
    assert "teacher.answer" in str(err.value) and "teacher.latency_s" in str(err.value)


def test_evaluate_a_logged_model_on_teacher_rows_without_expectations(tracking_uri, tiny_model_dir, tmp_path):
    """`mlflow-finetune evaluate --data` of rows whose targets are the teacher's answers: the figure is the
    student's agreement with them, beside the prompt-only alternatives'."""
    torch.manual_seed(0)
    model = lora.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                       LoraAdapter(r=8, alpha=16, dropout=0.0))
    with mlflow.start_run():
        info = log_finetuned_model(model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir),
                                   {"base_model": TINY_MODEL_REF, "artifact": "adapter", "method": "lora"})
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in taught(chat_rows(3))))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(4, offset=10)))
    out = CliRunner().invoke(main, ["evaluate", info.model_uri, "--data", str(data), "--train", str(train),
                                    "--max-examples", "3", "--max-new-tokens", "4", "--fewshot-k", "1"])
    assert out.exit_code == 0, out.output
    assert "teacher" in next(line for line in out.output.splitlines() if line.startswith("metric"))
    assert ("no expectations to judge either by; the student agrees with the teacher's answers at "
            "rougeL") in out.output
    assert "prompting of its base: " in out.output  # the best prompt-only alternative's agreement beside it
    assert "the teacher's parameters (eval.teacher_params gives them)" in out.output
    assert "Cost per answer on this machine: prompt tokens over zero-shot's" in out.output
    run_id = out.output.split("Logged to run ")[1].split()[0]
    metrics = mlflow.MlflowClient().get_run(run_id).data.metrics
    assert metrics["eval/teacher/rougeL"] == 1.0 and metrics["eval/n_expected"] == 0
    assert metrics["eval/tuned/teacher_rougeL"] == metrics["eval/tuned/rougeL"]


def test_trace_rows_carry_the_teacher_with_its_model_usage_and_latency(tracking_uri):
    mlflow.set_experiment("app")
    for i, usage in enumerate(({"prompt_tokens": 11, "completion_tokens": 4}, None)):
        with mlflow.start_span("Completions", span_type=SpanType.CHAT_MODEL) as span:
            span.set_inputs({"messages": [{"role": "user", "content": f"question {i}?"}], "model": "gpt-big"})
            span.set_outputs({"id": "c", "object": "chat.completion", "model": "gpt-big", **(
                {"usage": usage} if usage else {}), "choices": [{"index": 0, "finish_reason": "stop",
                                                                 "message": {
                    "role": "assistant", "content": f"answer {i}"}}]})
        trace_id = span.trace_id
    mlflow.flush_trace_async_logging()
    mlflow.log_expectation(trace_id=trace_id, name="expected_response", value="the right answer")
    forget_active_experiment()
    got = read_traces(query_of("traces:app"))
    assert not got.issues, got.issues
    first, second = [rec for _, rec in got.records]
    assert first["teacher"]["answer"] == "answer 0" and first["teacher"]["model"] == "gpt-big"
    assert (first["teacher"]["prompt_tokens"], first["teacher"]["completion_tokens"]) == (11, 4)
    assert first["teacher"]["latency_s"] > 0
    # an expectation replaces the target; the teacher's answer stays what it logged; no usage logged: None
    assert second["messages"][-1]["content"] == ("the right "
                                                 "answer") and second["teacher"]["answer"] == "answer 1"
    assert second["teacher"]["prompt_tokens"] is None
    ds, _ = load_training_dataset("traces:app", records=got.records)
    assert [t["answer"] for t in teachers(ds)] == ["answer 0", "answer 1"]


@pytest.mark.integration
def test_a_lora_run_logs_cost_columns_and_trains_past_the_teacher_key(tmp_path, tracking_uri):
    """`mlflow run -e lora` on the tiny model: every contender's cost metrics logged and printed, and a
    held-out file with teacher answers (training rows with the key too) makes the teacher a contender of the
    run."""
    rows = taught(chat_rows(8))
    project = write_project(tmp_path / "project", "data:\n  max_length: 64\n  packing: false\n", rows=rows,
                            eval_rows=taught(chat_rows(3, offset=20), expect={1}))
    overrides = {**FAST_OVERRIDES, "eval.max_examples": 3, "data.eval": str(project / "data" / "eval.jsonl")}
    cmd = [sys.executable, "-m", "mlflow", "run", str(project), "-e", "lora", "--backend", "finetune",
           "--experiment-name", "cost"] + [a for k, v in overrides.items() for a in ("-P", f"{k}={v}")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(tracking_uri), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("cost").experiment_id])
    metrics = run.data.metrics
    for c in (*CONTENDERS, "teacher"):
        for name in COST_METRICS if c != "teacher" else ("prompt_tokens", "answer_tokens", "latency_s"):
            assert math.isfinite(metrics[f"eval/{c}/{name}"]), (c, name)
    assert metrics["eval/retrieval/prompt_tokens"] > metrics["eval/base/prompt_tokens"]
    assert metrics["eval/n_expected"] == 1
    printed = proc.stdout + proc.stderr
    assert "tokens_per_s" in printed and "Cost per answer on this machine:" in printed
    assert "Student vs teacher:" in run.data.tags[VERDICT]


def test_the_teacher_sentence_weighs_the_student_on_the_expectation_rows():
    """The sentence from logged figures alone: a student below the teacher on 12 expectation rows beyond the
    noise, then one level with it; the savings only where both sides are known."""
    from mlflow_finetune_plugin.evaluate.teacher import teacher_sentence
    from mlflow_finetune_plugin.evaluate.verdict import paired_bootstrap

    metrics = {"eval/n_expected": 12, "eval/teacher/expected_rougeL": 0.8, "eval/tuned/expected_rougeL": 0.4,
               "eval/tuned/prompt_tokens": 40, "eval/tuned/answer_tokens": 20, "eval/tuned/params": 1.4e8,
               "eval/tuned/tokens_per_s": 40.0, "eval/teacher/prompt_tokens": 200,
               "eval/teacher/answer_tokens": 60, "eval/teacher/params": 2.8e8,
               "eval/teacher/tokens_per_s": 20.0}
    scores = {"teacher": {"rougeL": [0.8] * 12 + [1.0] * 3, "expected": [1.0] * 12 + [0.0] * 3},
              "tuned": {"rougeL": [0.4] * 12 + [0.3] * 3}}
    said = teacher_sentence(metrics, scores, "rougeL", paired_bootstrap)
    assert said.startswith("Student vs teacher: the student keeps 50% of the teacher's rougeL against the "
                           "expectations (0.40 vs 0.80 on 12 rows, below the teacher beyond the evaluation's "
                           "noise")
    assert "60 tokens per answer vs 260" in said and ("0.5x the "
                                                      "parameters") in said and "2x the tokens/s" in said
    scores["tuned"]["rougeL"] = [0.7, 0.9] * 6 + [0.3] * 3
    assert "within the noise of the teacher" in teacher_sentence(metrics, scores, "rougeL", paired_bootstrap)
    unknown = {k: v for k, v in metrics.items() if not k.startswith("eval/teacher/") or "expected" in k}
    said = teacher_sentence(unknown, scores, "rougeL", paired_bootstrap)
    assert "not known: the teacher's token usage, the teacher's parameters" in said and "x the" not in said


def test_a_teachers_seconds_are_shared_among_the_requests_in_flight_and_its_size_comes_from_its_rows():
    """-e distill asked a server 4 at a time: each round trip also waited for the other three, so the
    teacher's seconds per answer are a quarter of it (as a batch's time is shared among its rows); a trace's
    latency (no concurrency) is its own. A registered teacher's rows carry its parameters; eval.teacher_params
    wins over them."""
    from mlflow_finetune_plugin.evaluate.cost import teacher_costs

    asked = [{"answer": "a", "completion_tokens": 10, "latency_s": 4.0, "concurrency": 4, "params": 300}] * 3
    costs = teacher_costs(asked)
    assert costs["latency_s"] == 1.0 and costs["tokens_per_s"] == 10.0 and costs["params"] == 300
    traced = [{"answer": "a", "completion_tokens": 10, "latency_s": 4.0}] * 3
    assert teacher_costs(traced)["tokens_per_s"] == 2.5 and "params" not in teacher_costs(traced)
    assert teacher_costs(asked, params=1000)["params"] == 1000
