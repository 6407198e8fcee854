"""`-e distill` asking a served teacher, measured on the real models (issue 53, point 2;
docs/benchmarks-history.md section 10).

The registered "production" model (the gemma3 support bot) is served with `mlflow-finetune serve --engine
transformers` on 127.0.0.1, and the copyable recipe runs as a user would run it:

    mlflow run recipes/distill -e distill --backend finetune -P distill.teacher=http://127.0.0.1:PORT/v1

The teacher answers recipes/distill's 80 prompts and the held-out questions over HTTP; the student (smollm2)
trains on its answers; the evaluation scores the teacher's answers beside the student and its base's
prompt-only contenders. Prints the teacher's figures (asked, kept, seconds), the time from launch to the first
training step and to the end, and the contenders' table (bench/distill_real.py's columns).

    python bench/distill_endpoint.py --teacher support-teacher/1 --teacher-params 268098176 --workdir
    /tmp/distill
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, client, header, log, mlflow_run, serve, setup, table  # noqa: E402
from distill_real import COLUMNS, row  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="the production model, NAME/VERSION")
    parser.add_argument("--teacher-params", type=int, default=None)
    parser.add_argument("--port", type=int, default=8792)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("-P", dest="params", action="append", default=[],
                        help="more -P k=v for the student's run")
    args = parser.parse_args()
    work, env = setup(args.workdir)

    started = time.time()
    server = serve(args.teacher, args.port, env, work / "logs" / "teacher-serve.log")
    log(f"teacher {args.teacher} serving on 127.0.0.1:{args.port} after {time.time() - started:.0f} s")
    params = {"distill.teacher": f"http://127.0.0.1:{args.port}/v1", "registry.name": "support-distilled"}
    if args.teacher_params:
        params["eval.teacher_params"] = args.teacher_params
    params.update(p.split("=", 1) for p in args.params)
    try:
        student = mlflow_run(params, env, work, "distill-endpoint", project=REPO / "recipes" / "distill",
                             entry="distill")
    finally:
        server.terminate()
        server.wait(timeout=60)

    c = client()
    run = c.get_run(student["run_id"])
    import mlflow

    def artifact(path: str) -> str:
        return Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=path,
                                                        dst_path=str(work / "artifacts"))).read_text()

    summary = json.loads(artifact("distill/summary.json"))
    answers = [json.loads(line) for line in artifact("distill/answers.jsonl").splitlines()]
    first_step = min(m.timestamp for m in c.get_metric_history(run.info.run_id, "train/loss")) / 1000
    header("## -e distill: the student trained on a served teacher's answers")
    wall = re.search(r"\): (\d+) answers in ([\d.]+) s", (work / "logs" / "distill-endpoint.log").read_text())
    print(f"Teacher: {run.data.tags.get('finetune.distill.teacher')}; {summary['asked']} prompts asked, "
          f"{summary['cached']} from the cache; median round trip "
          f"{statistics.median(a['latency_s'] for a in answers):.2f} s with {answers[0].get('concurrency')} "
          "in flight"
          + (f"; {wall.group(1)} answers in {float(wall.group(2)):.0f} s of wall time" if wall else ""))
    for split in ("data.train", "data.eval"):
        if split in summary:
            s = summary[split]
            print(
                f"  {split}: {s['prompts']} prompts, {s['rows']} rows, {s['left_out']} left out "
                f"{s['why'] or ''}")
    print(
        f"Launch to the first training step: {first_step - student['launched']:.0f} s (checks, the teacher's "
        f"answers, the student's load); launch to exit: {student['exited'] - student['launched']:.0f} s "
        f"(train/summary_runtime {run.data.metrics.get('train/summary_runtime', float('nan')):.0f} s)\n")
    rows = [row(run.data.metrics, "teacher", f"teacher {args.teacher} (served, its answers here)"),
            row(run.data.metrics, "base", "smollm2 zero-shot"),
            row(run.data.metrics, "fewshot", "smollm2 few-shot"),
            row(run.data.metrics, "retrieval", "smollm2 + retrieved shots"),
            row(run.data.metrics, "tuned", "student (smollm2 LoRA on the teacher's answers)")]
    print(table(["contender"] + [label for _, label in COLUMNS], rows))
    print(f"\nVerdict: {run.data.tags.get('finetune.verdict')}")


if __name__ == "__main__":
    main()
