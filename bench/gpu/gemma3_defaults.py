"""Defaults for instruction-tuning the base model gemma3: several support-bot runs side by side on one GPU.

Each configuration is a whole `mlflow run recipes/support-bot -e lora --backend finetune -P model=gemma3 -P
k=v ...` (training, evaluation against base / few-shot / retrieval, the forgetting check, registration), in
its own process with its own sqlite store, all started at once (a 270M model leaves a GPU mostly idle). The
table: each run's tuned rougeL beside the three alternatives, the bootstrap interval of its margin over the
best of them, the forgetting ratio, how many tuned answers ended their turn before `eval.max_new_tokens`, and
the run's wall time.

    python bench/gpu/gemma3_defaults.py                       # the configurations below
    python bench/gpu/gemma3_defaults.py --config a:train.learning_rate=1e-3 --config
    b:train.learning_rate=5e-4

The conclusions are confirmed on CPU with the bundled recipe (docs/models.md): figures on a GPU under bf16 are
a guide to the defaults, not the CPU's figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import common  # noqa: E402

CONFIGS = [
    "lr4e-3:train.learning_rate=4e-3",  # smollm2's default: the issue's 6.68 ppl ratio
    "lr2e-3:train.learning_rate=2e-3",
    "lr1e-3:train.learning_rate=1e-3",
    "lr5e-4:train.learning_rate=5e-4",
    "lr2e-4:train.learning_rate=2e-4",
    "lr1e-3-kl1:train.learning_rate=1e-3,data.replay_every=1",
    "lr5e-4-3ep:train.learning_rate=5e-4,train.epochs=3",
    "lr1e-3-3ep:train.learning_rate=1e-3,train.epochs=3",
]
KEYS = ["base", "fewshot", "retrieval", "tuned"]


def parse(config: str) -> tuple[str, dict]:
    name, _, pairs = config.partition(":")
    return name, dict(p.split("=", 1) for p in pairs.split(",") if p)


def one(name: str, params: dict, work: Path, base_env: dict, out_dir: str) -> dict:
    result = _one(name, params, work, base_env)
    Path(out_dir, f"{name}.json").write_text(json.dumps(result, indent=1))  # kept if a later run is cut off
    return result


def _one(name: str, params: dict, work: Path, base_env: dict) -> dict:
    folder = work / name
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    env = {**base_env, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    started = time.time()
    try:
        run = common.mlflow_run({"model": "gemma3", **params}, env, folder, name)
    except RuntimeError as e:
        return {"name": name, "error": str(e)[-2000:]}
    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    info = client.get_run(run["run_id"])
    metrics, tags = info.data.metrics, info.data.tags
    out = {"name": name, "params": params, "wall_s": round(time.time() - started, 1),
           **{k: metrics.get(f"eval/{k}/rougeL") for k in KEYS},
           "ppl_ratio": metrics.get("eval/forgetting/ppl_ratio"),
           "tuned_loss": metrics.get("eval/tuned/loss"), "retrieval_loss": metrics.get("eval/retrieval/loss"),
           "verdict": tags.get("finetune.verdict"), "paid_off": tags.get("finetune.verdict.paid_off"),
           "train_s": metrics.get("train/summary_runtime")}
    path = client.download_artifacts(run["run_id"], "eval/examples.json", str(folder))
    examples = json.loads(Path(path).read_text())
    rows = examples if isinstance(examples, list) else [dict(zip(examples["columns"], d))
                                                        for d in examples["data"]]
    out["examples"] = [{k: r[k] for k in ("prompt", "reference", "tuned_answer", "retrieval_answer")}
                       for r in rows[:4]]
    words = [len(str(r["tuned_answer"]).split()) / max(1, len(str(r["reference"]).split())) for r in rows]
    # tuned answer words / reference words: run-ons show
    out["length_ratio"] = sum(words) / max(1, len(words))
    out["n_examples"] = len(rows)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", help="NAME:key=value,key=value (recipe keys as for -P)")
    p.add_argument("--workdir", default="/tmp/gemma3-defaults")
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    work, env = common.setup(args.workdir)
    configs = [parse(c) for c in (args.config or CONFIGS)]
    common.header(f"gemma3 support-bot defaults, {len(configs)} runs, {args.parallel} at a time")
    subprocess.run([sys.executable, "-c", "from mlflow_finetune_plugin.models.gemma3 import gemma3_path; "
                    "print(gemma3_path())"], env=env, check=True)  # convert once, before the runs share it
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda c: one(c[0], c[1], work, env, args.out), configs))
    Path(args.out, "gemma3_defaults.json").write_text(json.dumps(results, indent=1))
    rows = [[r["name"], *(common.fmt(r[k]) if r.get(k) is not None else "-" for k in KEYS),
             common.fmt(r["ppl_ratio"]) if r.get("ppl_ratio") is not None else "-", r.get("paid_off", "-"),
             common.fmt(r["length_ratio"]), r.get("wall_s", "-")] if "error" not in r
            else [r["name"], "FAILED", "", "", "", "", "", "", ""]
            for r in results]
    print(common.table(["config", "base", "fewshot", "retrieval", "tuned", "ppl_ratio", "paid off",
                        "words/ref", "wall s"], rows))
    for r in results:
        print(f"\n{r['name']}: {r.get('verdict') or r.get('error')}")


if __name__ == "__main__":
    main()
