"""How many threads a heavy process of this project takes (training, a served model, the playground), so that
several of them on one machine share its cores instead of fighting over them.

torch starts as many intra-op threads as the machine has physical cores, in every process. Two such processes
on the same cores ask for twice the cores there are, and the OpenMP threads of each spin at every barrier
while they wait for a partner the other process has pushed off its core. So each process divides the cores it
may use (`cores.py`) by the heavy processes of the project that use them now, itself included (`claims.py`),
and re-counts while it runs (`refit`, between training steps and between batches of evaluation answers): a
second job that starts halves the first one's threads, and the first gets them back when the second ends.

`train.threads` in the recipe, or the user's own OMP_NUM_THREADS, fixes the count instead. OpenMP's waiting
policy is read once, when the OpenMP runtime loads (with torch), so only a launcher can choose it: `child_env`
asks processes that start on a shared machine to wait passively (sleep at once instead of spinning), and
leaves OpenMP's default to a process that starts alone, unless that process cannot re-count (`fixed`: serve's
engines).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from dataclasses import dataclass, replace

from mlflow_finetune_plugin.runtime import claims as registry
from mlflow_finetune_plugin.runtime.cores import Cores, load_average, usable

# Beside the OMP_NUM_THREADS a launcher set: the same value means the count was this project's choice, not the
# user's.
AUTO = "MLFLOW_FINETUNE_AUTO_THREADS"
CHECK_EVERY_S = 2.0  # how often a running process counts the others again
INTEROP = 1  # torch's inter-op pool runs independent ops side by side; no stage of the project asks it to


@dataclass(frozen=True)
class ThreadPlan:
    intra: int                 # torch's intra-op threads (OpenMP's team, MKL's and oneDNN's threads)
    interop: int               # torch's inter-op threads
    # OMP_WAIT_POLICY for a process started with `child_env`; None: OpenMP's default
    wait_policy: str | None
    source: str                # "auto", "recipe" (train.threads) or "environment" (OMP_NUM_THREADS)
    reason: str
    busy_note: str | None = None  # one line to print: the machine was already busy when this plan was made

    def describe(self) -> str:
        wait = f", OpenMP waits {self.wait_policy.lower()}" if self.wait_policy else ""
        return (
            f"{self.intra} intra-op / {self.interop} inter-op thread{'s' if self.interop > 1 else ''}{wait} "
            f"({self.reason})"
        )


_READ = object()


def plan(requested: int | None = None, what: str = "training", env=None, cores: Cores | None = None,
         others: list[registry.Claim] | None = None, load=_READ, running: bool = False,
         fixed: bool = False) -> ThreadPlan:
    """The threads for a process doing `what`: `requested` (train.threads) if given, else the user's
    OMP_NUM_THREADS, else this process's share of the usable cores among the live claims of other processes.
    `running`: the plan of this process itself, whose OpenMP runtime has loaded already, so its waiting policy
    is the environment's; else the policy for a process about to start. `fixed`: that process cannot re-count
    (another tool's server, `transformers serve`), so it waits passively even when it starts alone: a run
    started beside it later would otherwise meet its spinning threads (a served burst took 5.35x its time
    alone beside a training run, and passive waiting cost it nothing alone: docs/benchmarks.md, "Two jobs on
    one machine")."""
    env = os.environ if env is None else env
    cores = cores or usable()
    others = registry.others() if others is None else others
    load = load_average() if load is _READ else load
    mine = user_threads(env)
    if requested:
        intra, source, reason = requested, "recipe", f"train.threads: {requested} in the recipe"
    elif mine:
        intra, source, reason = mine, "environment", f"OMP_NUM_THREADS={mine} in the environment"
    else:
        intra, source = max(1, cores.count // (len(others) + 1)), "auto"
        reason = cores.why + (f", shared with {_processes(others)} of this project" if others
                              else ", no other heavy process of this project on this machine")
    # Counting the processes being started now: this one's own load is at most 1.
    busy_load = load is not None and not others and load > cores.count
    shared = bool(others) or busy_load or intra + sum(c.threads for c in others) > cores.count
    wait = env.get("OMP_WAIT_POLICY") or (None if running or not (shared or fixed) else "PASSIVE")
    chosen = ThreadPlan(intra, INTEROP, wait, source, reason)
    note = None
    if others:
        note = f"This machine is already busy: {_processes(others)} of this project " \
               f"{'runs' if len(others) == 1 else 'run'} on its {cores.count} " \
               f"cores ({'; '.join(map(str, others))}). This {what} takes {chosen.describe()}."
    elif busy_load:
        note = (
            f"This machine is already busy: load average {load:.1f} on {cores.count} cores, from processes "
            f"outside this project. This {what} takes {chosen.describe()}; set train.threads or "
            "OMP_NUM_THREADS to take fewer."
        )
    return replace(chosen, busy_note=note)


def _processes(others) -> str:
    return f"{len(others)} other heavy process{'es' if len(others) > 1 else ''}"


def user_threads(env=None) -> int | None:
    """OMP_NUM_THREADS as the user set it (its first number, as OpenMP reads `4,2`), or None: unset, not a
    number, or set by this project's own launcher (AUTO holds the same value)."""
    env = os.environ if env is None else env
    value = env.get("OMP_NUM_THREADS", "").strip()
    if not value or env.get(AUTO) == value:
        return None
    first = value.split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


def child_env(chosen: ThreadPlan, env=None) -> dict[str, str]:
    """The environment entries a launcher adds for the process it starts with `chosen`: its OpenMP team size
    and waiting policy from the start (the policy cannot change later). The user's own settings stay as they
    are."""
    env = os.environ if env is None else env
    out = {}
    if chosen.source != "environment":
        out["OMP_NUM_THREADS"] = out[AUTO] = str(chosen.intra)
    if chosen.wait_policy and not env.get("OMP_WAIT_POLICY"):
        out["OMP_WAIT_POLICY"] = chosen.wait_policy
    return out


def apply(chosen: ThreadPlan) -> None:
    """torch's intra-op threads (for the calling thread, and every thread that has not computed yet) and
    inter-op threads (only possible before the inter-op pool has run anything)."""
    import torch

    torch.set_num_threads(chosen.intra)
    _local.applied = chosen.intra
    if torch.get_num_interop_threads() != chosen.interop:
        try:
            torch.set_num_interop_threads(chosen.interop)
        except RuntimeError:  # its pool already started: it keeps its size, and idles
            pass


class _Share:
    def __init__(self, requested: int | None, what: str, chosen: ThreadPlan):
        self.requested, self.what, self.plan = requested, what, chosen
        self.checked = time.monotonic()


_share: _Share | None = None
_local = threading.local()


def start(requested: int | None = None, what: str = "training") -> ThreadPlan:
    """Plan this process's threads, register it as a heavy process of the project, and apply the plan. The
    claim is written before the others are counted, so that two processes starting together see each other."""
    global _share
    registry.claim(1, what)
    chosen = plan(requested, what, running=True)
    registry.claim(chosen.intra, what)
    atexit.register(registry.release, os.getpid())
    apply(chosen)
    _share = _Share(requested, what, chosen)
    return chosen


def stop() -> None:
    """This process is no longer a heavy one (a run ended in a process that goes on: tests, `mlflow-finetune
    train` from Python): its claim goes, and `refit` does nothing."""
    global _share
    if _share is not None:
        registry.release()
        _share = None


def refit() -> ThreadPlan | None:
    """In a process that `start`ed: count the other heavy processes again (at most every CHECK_EVERY_S) and
    take this process's new share; prints one line and returns the new plan when the count changed, else None.
    Call it from the thread that computes: OpenMP keeps the team size per thread."""
    share = _share
    if share is None:
        return None
    if getattr(_local, "applied", None) != share.plan.intra:
        apply(share.plan)
    now = time.monotonic()
    if share.plan.source != "auto" or now - share.checked < CHECK_EVERY_S:
        return None
    share.checked = now
    new = plan(None, share.what, load=None, running=True)
    if new.intra == share.plan.intra:
        return None
    registry.claim(new.intra, share.what)
    apply(new)
    print(f"Threads: {share.plan.intra} -> {new.intra} ({new.reason}).", file=sys.stderr, flush=True)
    share.plan = new
    return new


def current() -> ThreadPlan | None:
    """The plan this process `start`ed with, as last refitted."""
    return _share.plan if _share else None
