"""Where the plugin keeps local files: the tiny model build and per-run job folders (logs, checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$MLFLOW_FINETUNE_CACHE, else $XDG_CACHE_HOME/mlflow-finetune, else ~/.cache/mlflow-finetune."""
    if os.environ.get("MLFLOW_FINETUNE_CACHE"):
        return Path(os.environ["MLFLOW_FINETUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mlflow-finetune"


def job_dir(run_id: str) -> Path:
    """The local folder of one run's job: resolved recipe, job log, checkpoints before they are logged."""
    path = cache_root() / "runs" / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_build(name: str, build, complete=("config.json", "model.safetensors", "tokenizer.json")) -> Path:
    """`cache_root()/name`, made by `build(tmp_folder)` on first use.

    The build happens under a file lock into a temporary folder that is renamed into place, so concurrent
    processes build it once and never see a partial folder; a crashed build's leftovers are removed by the
    next one.
    """
    import shutil
    import tempfile

    from filelock import FileLock

    root = cache_root().absolute()
    target = root / name

    def is_complete() -> bool:
        # The rename is atomic, so a present target is a finished build; checking the key files also catches a
        # folder someone emptied by hand.
        return all((target / f).is_file() for f in complete)

    if is_complete():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{name}.lock")):
        if is_complete():  # another process built it while we waited for the lock
            return target
        for stale in root.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            build(tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def tensor_names(folder: Path, recursive: bool = False) -> list[str]:
    """The tensor names in a folder's safetensors files (their headers only: no weight is read); with
    `recursive`, its subfolders' too (a multi-adapter folder keeps one adapter per subfolder)."""
    import json
    import struct

    names = []
    for path in sorted(folder.rglob("*.safetensors") if recursive else folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            names += [k for k in json.loads(f.read(size)) if k != "__metadata__"]
    return names
