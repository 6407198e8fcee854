"""`python -m mlflow_finetune_plugin.train.warm`: a training process started before its run exists, so that
its imports overlap the backend's checks (`launchers/local.py`, `WarmProcess`).

Importing the training code (torch, transformers, PEFT, MLflow) takes about 7 s of one core; the backend's
checks before a run exists (recipe, data, tokenizer, tracking store) take about 3 s of the other. This process
imports first, then waits on stdin for one JSON line, `{"argv": [...], "env": {...}}`: the arguments of
`python -m mlflow_finetune_plugin.train.job` and the environment the launcher would have started it with. It
then runs exactly that. An empty stdin (the checks failed, or `mlflow run` was interrupted or killed) ends it
silently. An import that failed is reported only once the run is handed over, as a fresh training process
would report it.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

try:
    from mlflow_finetune_plugin.train import job
except BaseException:  # noqa: BLE001 - reported below, if a run is handed over at all
    job, failed = None, traceback.format_exc()


def main() -> None:
    line = sys.stdin.readline()
    if not line.strip():
        os._exit(0)  # nothing to run; skip the interpreter's teardown of what was imported
    go = json.loads(line)
    os.environ.update(go["env"])
    sys.stdin = open(os.devnull)  # noqa: SIM115 - as a process started with no input
    if job is None:
        print(failed, file=sys.stderr, end="")
        sys.exit(1)
    sys.argv = [job.__file__, *go["argv"]]
    job.main(go["argv"])


if __name__ == "__main__":
    main()
