"""runtime/allocator.py: the training process starts on tcmalloc where it is installed, and says which
allocator it runs with. The measured effect (time and peak memory of a smollm2 run) is in
docs/benchmarks.md."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mlflow_finetune_plugin.runtime import allocator

FOUND = "libtcmalloc_minimal.so.4"


@pytest.fixture
def installed(monkeypatch):
    monkeypatch.setattr(allocator, "tcmalloc", lambda: FOUND)


def test_a_launcher_preloads_tcmalloc_where_it_is_installed(installed):
    assert allocator.child_env({}) == {"LD_PRELOAD": FOUND, **allocator.QUIET}
    # the user's own preloaded libraries stay, before it; their own tcmalloc report threshold too
    got = allocator.child_env({"LD_PRELOAD": "/opt/libtrace.so",
                               "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "1"})
    assert got == {"LD_PRELOAD": f"/opt/libtrace.so {FOUND}"}


@pytest.mark.parametrize("env", [
    {"MLFLOW_FINETUNE_ALLOCATOR": "system"},                 # asked for the C library's
    {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},             # an allocator of the user's own
    {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"},
])
def test_the_users_choice_is_kept(installed, env):
    assert allocator.child_env(env) == {}


def test_without_tcmalloc_nothing_changes_and_the_log_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(allocator, "tcmalloc", lambda: None)
    monkeypatch.delenv("MLFLOW_FINETUNE_ALLOCATOR", raising=False)
    assert allocator.child_env({}) == {}
    if allocator.in_use() == "the C library's malloc":
        assert "installing tcmalloc (Debian/Ubuntu: libtcmalloc-minimal4)" in allocator.describe()


def test_a_process_started_with_the_env_runs_on_it():
    """A real child process: on tcmalloc with the launcher's entries where it is installed, else on the C
    library's; `in_use` tells which from the libraries the process has mapped."""
    code = "from mlflow_finetune_plugin.runtime import allocator; print(allocator.in_use())"
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("LD_PRELOAD", allocator.SETTING)}
    started = subprocess.run([sys.executable, "-c", code], env={**env, **allocator.child_env(env)},
                             capture_output=True, text=True, timeout=120, check=True)
    assert started.stdout.strip() == ("tcmalloc" if allocator.tcmalloc() else "the C library's malloc")
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                           check=True)
    assert plain.stdout.strip() == "the C library's malloc"


def test_the_peak_resident_set_counts_memory_the_process_touched_and_freed():
    with open("/proc/self/status", encoding="utf-8") as f:
        resident = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    block = bytearray(256 * 2**20)  # calloc'd: its pages become resident as they are written
    block[::4096] = b"x" * len(block[::4096])
    del block
    assert allocator.peak_rss_bytes() >= resident + 250 * 2**20
