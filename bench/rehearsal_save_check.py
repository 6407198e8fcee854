"""What does the rehearsal's save check cost a full fine-tune? The save alone vs the save and the reload
check.

Each side is a fresh process that loads the model (fp32, on the CPU, as a full fine-tune on the CPU holds it),
then runs its side once while a thread samples its resident memory every 2 ms, split as Linux splits it:
anonymous
(RssAnon: memory the process owns) and file-backed (RssFile: pages of mapped files, the kernel's to drop and
read again; transformers maps safetensors files and keeps the tensors as views of them where the dtype
matches):
  save          the logged model's save of `model/` and `tokenizer/` into a temporary folder (what the
  rehearsal did
                before issue 58, beside reading the saved tensors' names)
  save + check  the rehearsal's save and reload stages (`train/rehearsal.py`): the save, then
  `from_pretrained` of
                the saved folder with its loading report, and every reloaded weight compared with the model's
Figures: wall time of the side, and each peak minus its value before the side, against the size of the model's
weights. The sides alternate in rotated order.

    python bench/rehearsal_save_check.py               # smollm2, 3 reps: ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import common

SIDES = ("save", "save + check")


def memory(field: str) -> int:
    """RssAnon, RssFile or VmRSS of this process now, in bytes."""
    return 1024 * int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


FIELDS = ("RssAnon", "RssFile", "VmRSS")


def worker(side: str, model_name: str) -> dict:
    import threading

    import torch
    from transformers import AutoModelForCausalLM

    from mlflow_finetune_plugin.logged_model import saved_artifacts
    from mlflow_finetune_plugin.models.base import load_tokenizer, resolve_model_path
    from mlflow_finetune_plugin.train import rehearsal

    tokenizer = load_tokenizer(model_name)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_name), dtype=torch.float32)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    config = {"artifact": "full", "objective": "sft", "base_model": model_name}
    before = {field: memory(field) for field in FIELDS}
    peak, done = dict(before), threading.Event()

    def sample():
        while not done.wait(0.002):
            for field in FIELDS:
                peak[field] = max(peak[field], memory(field))

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    if side == "save":
        with tempfile.TemporaryDirectory() as tmp:
            saved_artifacts(model, tokenizer, config, Path(tmp))
    else:
        rehearsal._save_and_reload(model, tokenizer, config)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return {"seconds": seconds, "weights": weights, **{f: peak[f] - before[f] for f in FIELDS}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workdir", default=None)
    p.add_argument("--worker", nargs=2, metavar=("SIDE", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return

    work, env = common.setup(args.workdir)
    env["OMP_NUM_THREADS"] = "1"
    results = {side: [] for side in SIDES}
    for rep in range(args.reps):
        for side in common.rotated(list(SIDES), rep):
            common.log(f"rep {rep + 1}/{args.reps}: {side}")
            results[side].append(common.run_json([Path(__file__).resolve(), "--worker", side, args.model],
                                                 env, work, f"save-check-{side.replace(' + ', '-')}-{rep}"))

    mib = 2 ** 20
    weights = results["save"][0]["weights"] / mib
    common.header(
        f"The rehearsal's save check on a full fine-tune: {args.model}, fp32 weights {weights:.0f} MiB, "
        f"{args.reps} reps: median (range)")
    rows = [[side, common.summary(r["seconds"] for r in runs),
             *(common.summary(r[field] / mib for r in runs) for field in FIELDS),
             common.summary(r["RssAnon"] / r["weights"] for r in runs)]
            for side, runs in results.items()]
    print(common.table(["side", "time (s)", "anonymous peak growth (MiB)", "file-backed peak growth (MiB)",
                        "RSS peak growth (MiB)", "anonymous growth / weights"], rows))

if __name__ == "__main__":
    main()
