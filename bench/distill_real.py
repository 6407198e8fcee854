"""A small model from a larger one's production traffic, measured (issue 53, point 6; docs/benchmarks.md,
"A smaller model from a larger one's traffic").

After `bench/distill_traffic.py` has recorded a registered "production" model's answers as traces (train
questions in one experiment, held-out questions with every second answer corrected in another), this
1. trains the student on those traces, `mlflow run recipes/support-bot -e lora --backend finetune -P
   data=traces:TRAIN -P data.eval=traces:REVIEWED` (smollm2 unless --student), timed; its evaluation scores
   the teacher's logged answers, the student, and its base zero-shot, few-shot and with retrieved shots;
2. evaluates the teacher itself on the same held-out rows (`mlflow-finetune evaluate models:/TEACHER --data
...`),
   so that its cost per answer is measured the same way as the student's (in process, batched, this machine),
   not only as served one request at a time;
3. prints one table: agreement with the teacher's answers, agreement with the corrections, and the cost
columns.

    python bench/distill_real.py --teacher support-teacher/1 --teacher-params 268098176 --workdir /tmp/distill
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SUPPORT_BOT, client, header, log, mlflow_run, setup, table  # noqa: E402

COLUMNS = [("teacher_rougeL", "agrees with teacher (rougeL)"), ("expected_rougeL", "vs corrections (rougeL)"),
           ("rougeL", "rougeL vs targets"), ("prompt_tokens", "prompt tokens"),
           ("answer_tokens", "answer tokens"), ("latency_s", "median s / answer"),
           ("tokens_per_s", "tokens/s"), ("params", "parameters")]


def row(metrics: dict, contender: str, label: str) -> list:
    cells = [label]
    for key, _ in COLUMNS:
        value = metrics.get(f"eval/{contender}/{key}")
        cells.append("-" if value is None else f"{value / 1e6:.0f}M" if key == "params" else
                     f"{value:.1f}" if key in ("prompt_tokens", "answer_tokens", "tokens_per_s")
                     else f"{value:.3f}")
    return cells


def evaluate_teacher(c, args, name: str, version: str, reviewed: Path, env: dict, work: Path) -> str:
    """`mlflow-finetune evaluate` of the teacher on the held-out rows, into a run of its own: the run's id."""
    experiment = c.get_experiment_by_name("distill-bench") or c.get_experiment(
        c.create_experiment("distill-bench"))
    teacher_run = c.create_run(experiment.experiment_id, run_name=f"evaluate {args.teacher}").info.run_id
    evaluated = subprocess.run(
        [sys.executable, "-c", "import sys; from mlflow_finetune_plugin.cli import main; sys.exit(main())",
         "evaluate", f"models:/{name}/{version}", "--data", str(reviewed), "--max-examples",
         str(args.max_examples), "--fewshot-k", "0", "--retrieval-k", "0", "--run-id", teacher_run], env=env,
        cwd=work,
        capture_output=True, text=True)
    (work / "logs" / "teacher-evaluate.log").write_text(evaluated.stdout + evaluated.stderr)
    if evaluated.returncode:
        raise RuntimeError(f"teacher evaluate failed: see {work / 'logs' / 'teacher-evaluate.log'}")
    return teacher_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="the production model, NAME/VERSION")
    parser.add_argument("--teacher-params", type=int, default=None)
    parser.add_argument("--student", default="smollm2")
    parser.add_argument("--train-experiment", default="support-app")
    parser.add_argument("--eval-experiment", default="support-app-reviewed")
    parser.add_argument("--max-examples", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=None,
                        help="the student's train.epochs (default: the recipe's 2)")
    parser.add_argument("--teacher-run", default=None, help="reuse this run's evaluation of the teacher")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work, env = setup(args.workdir)

    reviewed = work / "reviewed.jsonl"
    subprocess.run([sys.executable, "-c",
                    "import sys; from mlflow_finetune_plugin.cli import main; sys.exit(main())", "data",
                    "from-traces", args.eval_experiment, "-o", str(reviewed)], env=env, check=True)
    params = {"model": args.student, "data": f"traces:{args.train_experiment}",
              "data.eval": f"traces:{args.eval_experiment}", "eval.max_examples": args.max_examples,
              "registry.name": "support-student"}
    if args.teacher_params:
        params["eval.teacher_params"] = args.teacher_params
    if args.epochs:
        params["train.epochs"] = args.epochs
    log("training the student on the teacher's traces")
    student = mlflow_run(params, env, work, "student", project=SUPPORT_BOT)
    log(
        f"student run {student['run_id']}: {student['exited'] - student['launched']:.0f} s; evaluating the "
        "teacher")
    started = time.time()
    name, version = args.teacher.split("/")
    c = client()
    if args.teacher_run:
        teacher_run = args.teacher_run
    else:
        teacher_run = evaluate_teacher(c, args, name, version, reviewed, env, work)
    teacher_seconds = time.time() - started

    s = c.get_run(student["run_id"])
    t_metrics = c.get_run(teacher_run).data.metrics
    header("## Distillation from traces: the student against the teacher whose answers it learned")
    rows = [row(s.data.metrics, "teacher",
                f"teacher {args.teacher}, as logged (served, one request at a time)"),
            row(t_metrics, "tuned", f"teacher {args.teacher}, in process (batched, as the student)"),
            row(s.data.metrics, "base", f"{args.student} zero-shot"), row(s.data.metrics, "fewshot",
                                                                          f"{args.student} few-shot"),
            row(s.data.metrics, "retrieval", f"{args.student} + retrieved shots"),
            row(s.data.metrics, "tuned", f"student ({args.student} LoRA on the traces)")]
    print(table(["contender"] + [label for _, label in COLUMNS], rows))
    n_expected = s.data.metrics.get("eval/n_expected")
    print(f"\nHeld-out rows: {args.max_examples} (of which {n_expected:.0f} corrected); student run "
          f"{student['run_id']} in {student['exited'] - student['launched']:.0f} s from launch to exit "
          f"(train/summary_runtime {s.data.metrics.get('train/summary_runtime', float('nan')):.0f} s); the "
          f"teacher's evaluate in {teacher_seconds:.0f} s.")
    print(f"\nVerdict (the student's run): {s.data.tags.get('finetune.verdict')}")


if __name__ == "__main__":
    main()
