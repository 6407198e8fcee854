"""The heavy processes of this project running on this machine, and the threads each has taken: one small file
per process in a per-user folder of this machine (not the cache, which may be a shared home directory),
written by the process itself or by the launcher that started it. No daemon and no lock: a file whose process
has ended is ignored, and removed by whoever reads it."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Claim:
    pid: int
    threads: int
    what: str          # "training", "serve engine", "playground", ...

    def __str__(self) -> str:
        return f"pid {self.pid}: {self.what}, {self.threads} thread{'s' if self.threads != 1 else ''}"


def folder() -> Path | None:
    """$XDG_RUNTIME_DIR/mlflow-finetune/threads, else <tmp>/mlflow-finetune-<uid>/threads; None where it
    cannot be made, or is not this user's own (then no process is counted, and none is registered)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = (
        Path(runtime) / "mlflow-finetune"
        if runtime
        else Path(tempfile.gettempdir()) / f"mlflow-finetune-{uid}"
    )
    path = base / "threads"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if hasattr(os, "getuid") and (base.stat().st_uid != uid or path.stat().st_uid != uid):
            return None
    except OSError:
        return None
    return path


def claim(threads: int, what: str, pid: int | None = None, where: Path | None = None) -> None:
    """Register `pid` (this process by default) as a heavy process of the project with `threads` threads; a
    second call updates it."""
    where = where or folder()
    if where is None:
        return
    pid = pid or os.getpid()
    record = {"pid": pid, "threads": threads, "what": what, "started": _started(pid)}
    tmp = where / f".{pid}.tmp"
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps(record))
        os.replace(tmp, where / f"{pid}.json")  # readers never see half a file


def release(pid: int | None = None, where: Path | None = None) -> None:
    where = where or folder()
    if where is not None:
        with contextlib.suppress(OSError):
            (where / f"{pid or os.getpid()}.json").unlink()


def others(where: Path | None = None, exclude: int | None = None) -> list[Claim]:
    """The live claims of processes other than `exclude` (this process by default), oldest pid first. A claim
    whose process is gone (or whose pid now names another process) is removed."""
    where = where or folder()
    if where is None:
        return []
    exclude = exclude or os.getpid()
    found = []
    for path in where.glob("*.json"):
        try:
            record = json.loads(path.read_text())
            pid, threads, what = int(record["pid"]), int(record["threads"]), str(record["what"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced, or not ours to judge: skip it, leave it
        if not _alive(pid, record.get("started")):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        if pid != exclude:
            found.append(Claim(pid, max(1, threads), what))
    return sorted(found, key=lambda c: c.pid)


def _started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), so that a pid reused
    by a later process does not keep a claim alive; None where /proc has no such file."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # fields after the command name, which may hold spaces


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process has this pid now (claims are per user)
    except OSError:
        return False
    now = _started(pid)
    if now is not None and started is not None and now != started:
        return False
    return _not_zombie(pid)


def _not_zombie(pid: int) -> bool:
    """A child that ended but was not waited for yet still has its pid: it uses no core."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True
