"""Which memory allocator a training process runs with: tcmalloc where it is installed, else the C library's.

A training step allocates and frees tensors of many sizes, the same ones every step. glibc's malloc keeps what
is freed in size classes it cannot always reuse for the next step's slightly different sizes, so a process
grows: a smollm2 LoRA run on support-bot went from 2.31 GiB at its first step to 3.01 GiB after 60 steps, and
glibc's own remedy (mapping every allocation on its own, `MALLOC_MMAP_THRESHOLD_`) halved the speed. tcmalloc
(gperftools) keeps per-size caches that the next step reuses: the same 60 steps took 96-101 s against 108-121
s and peaked at 2.47-2.48 GiB (docs/benchmarks-history.md, "LLaMA-Factory in bf16 on Zen 4"). Intel's PyTorch
launcher preloads it (or jemalloc) for CPU training for the same reason; jemalloc was measured too and saved
the memory, not the time.

An allocator is chosen when a process starts (the dynamic loader's LD_PRELOAD), so only a launcher can choose
it: `child_env` adds tcmalloc to the LD_PRELOAD of the training process the backend starts, when the library
is installed (Debian/Ubuntu `libtcmalloc-minimal4`, Fedora `gperftools-libs`, conda `gperftools`). Nothing is
downloaded or required: without it, the C library's allocator is used as before.
`MLFLOW_FINETUNE_ALLOCATOR=system` keeps the C library's; an LD_PRELOAD that already names an allocator is
left as it is.
"""

from __future__ import annotations

import ctypes.util
import functools
import os
import sys

# "system": the C library's malloc; anything else or unset: tcmalloc if found
SETTING = "MLFLOW_FINETUNE_ALLOCATOR"
# Allocators a user may have preloaded already: theirs is kept.
KNOWN = ("tcmalloc", "jemalloc", "mimalloc")
# tcmalloc reports every allocation above 1 GiB on stderr ("tcmalloc: large alloc"): a large vocabulary's
# logits reach that, and the report is noise in a run's log.
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2 ** 40)}
SYSTEM = "the C library's malloc"


def _system_asked(env) -> bool:
    return env.get(SETTING, "").lower() == "system"


@functools.lru_cache(maxsize=1)
def tcmalloc() -> str | None:
    """The name of an installed tcmalloc the dynamic loader finds, or None. Not loaded here: an allocator
    loaded into a process that has already allocated would free what the C library's allocated."""
    if not sys.platform.startswith("linux"):
        return None
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def child_env(env=None) -> dict[str, str]:
    """The environment entries that start a training process on tcmalloc ({} where it stays on the C
    library's)."""
    env = os.environ if env is None else env
    preload = env.get("LD_PRELOAD", "")
    if _system_asked(env) or any(name in preload for name in KNOWN):
        return {}
    found = tcmalloc()
    if found is None:
        return {}
    return {"LD_PRELOAD": f"{preload} {found}".strip(), **{k: v for k, v in QUIET.items() if k not in env}}


def in_use() -> str:
    """The allocator this process runs with, in words (from the libraries it has mapped)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            maps = f.read()
    except OSError:
        return SYSTEM
    return next((name for name in KNOWN if f"lib{name}" in maps), SYSTEM)


def describe() -> str:
    """One line for the run's log: the allocator, and how to get tcmalloc where the C library's is used."""
    used = in_use()
    if used != SYSTEM:
        return f"Memory allocator: {used}"
    if _system_asked(os.environ):
        return f"Memory allocator: {used} ({SETTING}=system)"
    if tcmalloc():
        return (f"Memory allocator: {used} (tcmalloc is installed: training started by `mlflow run` preloads "
                "it)")
    return (
        f"Memory allocator: {used}; installing tcmalloc (Debian/Ubuntu: libtcmalloc-minimal4) makes CPU "
        "training faster and leaner (docs/scaling.md)")


def _status_bytes(field: str) -> int | None:
    """A memory line of Linux's /proc/self/status (`VmRSS`, `VmHWM`) in bytes; None elsewhere."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """This process's resident set now (Linux VmRSS); elsewhere its peak (`peak_rss_bytes`), in bytes."""
    return _status_bytes("VmRSS") or peak_rss_bytes()


def peak_rss_bytes() -> int | None:
    """This process's peak resident set so far (Linux VmHWM; elsewhere getrusage's ru_maxrss), in bytes; None
    where neither is available. What the allocator keeps counts: it is memory the machine gave the process."""
    if (peak := _status_bytes("VmHWM")) is not None:
        return peak
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux and the BSDs
