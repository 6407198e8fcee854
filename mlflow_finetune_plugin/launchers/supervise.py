"""The supervisor of a detached job: runs the training command, then makes sure its MLflow run ended.

`python -m mlflow_finetune_plugin.launchers.supervise --run-id RUN_ID -- CMD...`
"""

from __future__ import annotations

import signal
import subprocess
import sys

from mlflow_finetune_plugin.launchers.local import finalize


def main(argv: list[str]) -> int:
    """Detached mode: run the training command, then make sure its MLflow run ended."""
    run_id = argv[argv.index("--run-id") + 1]
    cmd = argv[argv.index("--") + 1:]
    cancelled = False

    def on_term(signum, frame):
        nonlocal cancelled
        cancelled = True  # the child, in our process group, got the same signal

    signal.signal(signal.SIGTERM, on_term)
    child = subprocess.Popen(cmd)
    while True:
        try:
            returncode = child.wait()
            break
        except InterruptedError:
            continue
    status = finalize(run_id, returncode, cancelled=cancelled)
    print(f"Run {run_id} ended {status}", flush=True)
    return 0 if status == "FINISHED" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
