"""torchrun itself, minus the tracebacks it prints when it is stopped (cancel sends it SIGTERM) or when the
node hosting the rendezvous goes away; its ranks on a CPU share one measurement of bf16's speed
(`models/precision.for_every_rank`), taken here before they start unless the launcher handed one down.

`python -m mlflow_finetune_plugin.launchers.quiet_torchrun TORCHRUN_ARGS...`
"""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> int:
    """Run torchrun with `argv`; a stop signal ends it with 128 + the signal number and one line, no
    traceback."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from torch.distributed.run import main as torchrun

    from mlflow_finetune_plugin.models.precision import for_every_rank

    os.environ.update(for_every_rank())  # inherited by every rank this node starts
    try:
        torchrun(argv)
    except SignalException as e:
        print(f"torchrun: stopped by {signal.Signals(e.sigval).name}", file=sys.stderr)
        return 128 + int(e.sigval)
    except RendezvousConnectionError:
        # The node hosting the c10d rendezvous (the one `mlflow run` started) has gone: the job has ended
        # there.
        print(
            "torchrun: lost the rendezvous (the node hosting it has stopped or failed); this node stops too",
            file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
