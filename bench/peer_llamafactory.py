"""The same fine-tune with `mlflow run -e lora` and with LLaMA-Factory 0.9.5: step time, tokens/s, peak
memory, rougeL.

Both tools fine-tune the built-in smollm2 (the same converted folder) on recipes/support-bot's train rows,
with the recipe's settings as the project's recipe loader resolves them for `-e lora -P data.replay=false`:
LoRA r, alpha and
dropout on all linear layers, learning rate, cosine schedule, warmup, weight decay, gradient clipping, batch,
epochs, seed, rows packed up to data.max_length tokens with attention kept within each conversation, loss on
the assistant's turns only; in the precision `--precision` gives both (bf16: the Trainer's autocast over fp32
weights, on a CPU, in both tools).

  project         mlflow run recipes/support-bot -e lora --backend finetune --env-manager local -P
  data.replay=false
                  -P eval.enabled=false -P train.precision=P (its evaluation is done below, for both adapters
                  alike)
  LLaMA-Factory   llamafactory-cli train (through bench/llamafactory_train.py, which counts tokens), in its
  own
                  virtual environment: stage sft, lora_target all, template smollm2 (token for token the
                  model's own chat template on these rows), cutoff_len, packing + neat_packing,
                  train_on_prompt false, gradient checkpointing off (LLaMA-Factory's default is on; the
                  recipe's is off), bf16 with use_cpu

Figures, each tool measured the same way: steps; s/step = the Trainer's `train_runtime` / steps; tokens/s =
the non-padding tokens of the training batches (the real tokens of each packed row, prompts included: TRL's
count for the project, the same count taken in LLaMA-Factory's collator) / `train_runtime`; peak RSS of
training = the training process's VmHWM when training ends (everything before it included: imports, data,
model, the project's rehearsal; the project's `train/peak_rss_gib`, the same read in LLaMA-Factory's process);
peak RSS of the command = the largest resident set of any process of the training command, which evaluates
nothing but saves, logs and registers (VmHWM polled, and wait4's ru_maxrss); the command's wall time
(start-up, data, model load, training, saving). Then rougeL and exact match of both adapters on the same
held-out rows (the first eval.max_examples of the recipe's eval file) through the project's evaluation code,
in this process: the same base in fp32, the adapter loaded with PEFT and merged while answering, greedy
answers of up to eval.max_new_tokens tokens in batches, the project's shipped metric modules.

LLaMA-Factory's environment is made on first use (or again with --setup) in
${XDG_CACHE_HOME:-~/.cache}/finetune-bench-llamafactory:
  pip install llamafactory==0.9.5 -c constraints-cpu.txt   torch stays the local CPU build; LLaMA-Factory's
  own
                                                           pins (transformers<=5.6.0, peft<=0.18.1,
                                                           trl<=0.24.0, datasets<=4.0.0, accelerate<=1.11.0)
                                                           hold there
  pip uninstall -y torchvision                             PyPI's CUDA build fails to import beside torch+cpu
  rm torchaudio/lib/*.so                                   PyPI's CUDA build needs libc10_cuda.so;
  LLaMA-Factory
                                                           imports torchaudio at module level (audio inputs),
                                                           and without its extension it imports as pure Python
Its `pip freeze` is kept there as installed.txt, and its versions are printed with the report.

Not the same in the two tools (each is the tool's own way, left as it is):
- LLaMA-Factory's smollm2 template also labels the newline after each answer's <|im_end|> (one more trained
token
  per answer); the model's template, which the project follows, marks the answer and <|im_end|> only.
- Packing: TRL's best-fit decreasing into rows of up to max_length, a batch padded to its longest row,
attention
  from `position_ids` (project); a greedy knapsack into rows of max_length - 1 tokens, each padded to
  max_length, attention from the collator's 4D block-diagonal mask (LLaMA-Factory). Both make 142 rows an
  epoch here.
- Under bf16 autocast the project keeps the logits in fp32 and adds each LoRA update (computed in bf16) to its
  base output in fp32; LLaMA-Factory's autocast rounds both to bf16 (its LoRA weights are fp32 too).
- The project's command also rehearses a training step and the model's save and reload before training, and
logs
  and registers the model in MLflow: in its wall time and peak RSS, not in s/step or tokens/s.
- The libraries: LLaMA-Factory's pins against the project's transformers, peft and trl (both printed).

    python bench/peer_llamafactory.py             # 2 epochs each (142 steps), 1 rep: ~25-30 min on 2 cores
    without
                                                  # native bf16 (less with AMX); + ~4 min making the venv the
                                                  first time
    python bench/peer_llamafactory.py --steps 3 --examples 4      # smoke test, ~1.5 min
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import common

LF_VERSION = "0.9.5"
VENV = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune-bench-llamafactory"
READY = "bench-ready"  # written last: a venv without it was left half made, and is made again
SIDES = ("LLaMA-Factory", "project")
REGISTERED = "peer-support-bot"
DATASET = "support_bot"
SHOWN = ("llamafactory", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "torchaudio")


# ---------------------------------------------------------------- LLaMA-Factory's environment


def lf_python() -> Path:
    return VENV / "bin" / "python"


def setup_venv(force: bool, log_file: Path) -> dict[str, str]:
    """LLaMA-Factory's virtual environment, made if missing (or `force`; pip's output to `log_file`); the
    versions installed there."""
    if force or not (VENV / READY).exists():
        shutil.rmtree(VENV, ignore_errors=True)
        common.log(f"making LLaMA-Factory's environment in {VENV} (a few minutes; log {log_file})")
        with open(log_file, "w") as out:
            def sh(*cmd: str) -> str:
                done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=out, text=True)
                out.write(done.stdout)
                out.flush()
                if done.returncode:
                    raise failed(" ".join(cmd), {"returncode": done.returncode}, log_file)
                return done.stdout

            python = str(lf_python())
            sh(sys.executable, "-m", "venv", str(VENV))
            sh(python, "-m", "pip", "install", f"llamafactory=={LF_VERSION}", "-c",
                 str(common.REPO / "constraints-cpu.txt"))
            sh(python, "-m", "pip", "uninstall", "-y", "torchvision")
            where = sh(python, "-c", "import importlib.util as u; s = u.find_spec('torchaudio'); "
                         "print(s.submodule_search_locations[0] if s else '')").strip()
            for library in (Path(where) / "lib").glob("*.so") if where else ():
                library.unlink()
            # torch must be the CPU build (no CUDA pulled in), and LLaMA-Factory's training path must import
            sh(python, "-c", "import torch, llamafactory.data.mm_plugin, llamafactory.train.tuner; "
                 "assert torch.version.cuda is None, torch.__version__")
            (VENV / "installed.txt").write_text(sh(python, "-m", "pip", "freeze"))
        (VENV / READY).touch()
    pins = dict(line.split("==", 1) for line in (VENV / "installed.txt").read_text().splitlines()
                if "==" in line)
    return {name: pins[name] for name in SHOWN if name in pins}


# ---------------------------------------------------------------- the recipe, in LLaMA-Factory's terms


def llamafactory_dataset(rows: list[dict], data_dir: Path) -> str:
    """Chat rows as a LLaMA-Factory dataset in `data_dir` (sharegpt format, OpenAI-style role/content tags;
    the system message leads each row); its name, for the YAML's `dataset` (with `dataset_dir: data_dir`)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    common.write_jsonl(data_dir / f"{DATASET}.jsonl", [{"messages": row["messages"]} for row in rows])
    (data_dir / "dataset_info.json").write_text(json.dumps({DATASET: {
        "file_name": f"{DATASET}.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                 "assistant_tag": "assistant", "system_tag": "system"}}}, indent=2))
    return DATASET


def llamafactory_config(recipe, model_dir: str, args, folder: Path) -> Path:
    """The recipe's train rows as a LLaMA-Factory dataset and its training YAML; the YAML's path."""
    import yaml

    if recipe.adapter.type != "lora" or recipe.model.quantization != "none" or recipe.data.format != "chat":
        raise SystemExit("this comparison mirrors a LoRA recipe on chat rows without quantization")
    lora = recipe.adapter
    targets = lora.target_modules
    target = "all" if targets == "all-linear" else ",".join([targets] if isinstance(targets, str)
                                                            else targets)
    data_dir = folder / "data"
    rows = [json.loads(line) for line in Path(recipe.data.train).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    llamafactory_dataset(rows, data_dir)
    t, pack = recipe.train, recipe.data.packing is not False
    config = {
        "model_name_or_path": model_dir, "trust_remote_code": recipe.model.trust_remote_code,
        "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "lora_target": target,
        "use_dora": lora.use_dora, "use_rslora": lora.use_rslora,
        "dataset": DATASET, "dataset_dir": str(data_dir), "template": "smollm2",
        # data.packing auto packs these rows (the project's decision is printed with the report)
        "cutoff_len": recipe.data.max_length, "packing": pack, "neat_packing": pack,
        "train_on_prompt": not recipe.data.assistant_only_loss, "overwrite_cache": True,
        "disable_gradient_checkpointing": not t.gradient_checkpointing,
        "output_dir": str(folder / "out"), "overwrite_output_dir": True, "save_strategy": "no",
        "logging_steps": t.logging_steps, "plot_loss": False, "report_to": "none",
        "per_device_train_batch_size": t.batch_size, "gradient_accumulation_steps": t.grad_accum,
        "learning_rate": t.learning_rate, "num_train_epochs": t.epochs,
        "max_steps": args.steps or t.max_steps,
        # below 1: a ratio (transformers 5)
        "lr_scheduler_type": t.lr_scheduler, "warmup_steps": t.warmup_ratio,
        "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm, "seed": t.seed, "data_seed": t.seed,
        "bf16": args.precision == "bf16", "use_cpu": not _cuda(), "dataloader_num_workers": 0,
    }
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------- running a training command, watched


def _peak_of(pid: int) -> int:
    """VmHWM (the peak resident set so far) of a process, in bytes; 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    return int(found.group(1)) * 1024 if found else 0


def watched(cmd: list[str], env: dict, cwd: Path, log_file: Path) -> dict:
    """Run `cmd` (output to `log_file`): its exit status, wall seconds and the peak resident set of its
    largest process (VmHWM of every process of the tree every 0.2 s, and the ru_maxrss wait4 reports for the
    tree's waited processes), in bytes."""
    import psutil

    peak, done = [0], threading.Event()
    with open(log_file, "w") as out:
        began = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)

        def poll():
            root = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    pids = [root.pid, *(c.pid for c in root.children(recursive=True))]
                except psutil.Error:
                    pids = []
                peak[0] = max([peak[0], *map(_peak_of, pids)])
                done.wait(0.2)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        poller.join()
    return {"returncode": proc.returncode, "wall": time.perf_counter() - began,
            "peak_rss": max(peak[0], usage.ru_maxrss * 1024)}


def failed(what: str, run: dict, log_file: Path) -> RuntimeError:
    tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-30:])
    return RuntimeError(f"{what} failed (exit {run['returncode']}); log {log_file}:\n{tail}")


# ---------------------------------------------------------------- the two sides


def run_llamafactory(recipe, model_dir: str, args, env: dict, work: Path, tag: str) -> dict:
    folder = work / "llamafactory" / tag
    shutil.rmtree(folder, ignore_errors=True)
    config = llamafactory_config(recipe, model_dir, args, folder)
    lf_env = {**env, "HF_DATASETS_CACHE": str(folder / "datasets-cache")}
    lf_env.pop("PYTHONPATH", None)  # LLaMA-Factory's environment imports nothing of this repository
    log_file = work / "logs" / f"{tag}.log"
    run = watched([str(lf_python()), str(common.REPO / "bench" / "llamafactory_train.py"), str(config)],
                  lf_env, folder, log_file)
    text = log_file.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if run["returncode"] or not lines:
        raise failed("llamafactory-cli train", run, log_file)
    dropped = len(re.findall(r"Dropped lengthy example", text))
    return {**json.loads(lines[-1]), **run, "adapter": folder / "out", "config": config,
            "note": f"{dropped} rows dropped as longer than cutoff_len" if dropped else ""}


def project_params(args) -> dict:
    params = {"data.replay": "false", "eval.enabled": "false", "registry.name": REGISTERED,
              "train.precision": args.precision}
    return {**params, "max_steps": args.steps} if args.steps else params


def run_project(args, env: dict, work: Path, tag: str) -> dict:
    import mlflow

    from mlflow_finetune_plugin import tags

    cmd = ["mlflow", "run", str(common.SUPPORT_BOT), "-e", "lora", "--backend", "finetune", "--env-manager",
           "local"]
    for key, value in project_params(args).items():
        cmd += ["-P", f"{key}={value}"]
    log_file = work / "logs" / f"{tag}.log"
    run = watched(cmd, env, work, log_file)
    text = log_file.read_text(errors="replace")
    started = re.search(r"=== Run ([0-9a-f]{32}) started", text)
    if run["returncode"] or not started:
        raise failed("`" + " ".join(cmd) + "`", run, log_file)
    run_id = started.group(1)
    figures = common.training_figures(run_id)
    client = common.client()
    steps = client.get_metric_history(run_id, "train/summary_runtime")[-1].step
    packed = re.search(r"(\d+) examples in (\d+) packed rows", text)
    version = client.search_model_versions(f"name='{REGISTERED}' and run_id='{run_id}'")[0]
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{REGISTERED}/{version.version}",
                                                      dst_path=str(work / "project" / tag)))
    peak = client.get_metric_history(run_id, "train/peak_rss_gib")[-1].value * 2**30
    return {**figures, **run, "steps": steps, "packed_rows": int(packed.group(2)) if packed else None,
            "train_peak_rss": peak,
            "adapter": adapter_folder(folder), "note": client.get_run(run_id).data.tags.get(tags.PACKING, "")}


def adapter_folder(model_folder: Path) -> Path:
    """The adapter's folder inside a downloaded logged model (the pyfunc artifact named `adapter`)."""
    from mlflow.models import Model

    artifacts = Model.load(str(model_folder / "MLmodel")).flavors["python_function"]["artifacts"]
    return model_folder / artifacts["adapter"]["path"]


# ---------------------------------------------------------------- the same evaluation for both adapters


def held_out(recipe, n: int) -> tuple[list[list[dict]], list[str]]:
    """The first `n` conversations of the recipe's eval file that end with an answer: (prompts, references),
    as the project's evaluation picks them."""
    from mlflow_finetune_plugin.evaluate.contenders import conversations
    from mlflow_finetune_plugin.messages import split_conversation

    rows = [json.loads(line) for line in Path(recipe.data.eval).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    pairs = [pair for conv in conversations(rows) if (pair := split_conversation(conv)) and pair[0]][:n]
    return [p for p, _ in pairs], [r for _, r in pairs]


def score_adapter(model_dir: str, adapter: Path, recipe, prompts, references, name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlflow_finetune_plugin.evaluate.answering import answer_all, lora_merged
    from mlflow_finetune_plugin.evaluate.scoring import contender_metrics
    from mlflow_finetune_plugin.logged_model import stop_at_every_end_of_turn
    from mlflow_finetune_plugin.models.peft_targets import load_adapter

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_adapter(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter).eval()
    stop_at_every_end_of_turn(model, tokenizer)
    with lora_merged(model) as merged:
        answers, nll, n_tokens, _ = answer_all(merged, tokenizer, prompts, references, recipe.eval, name)
    totals, _ = contender_metrics(answers, references, nll, n_tokens, recipe.eval)
    return {"rougeL": totals["rougeL"], "exact": totals["exact_match"], "answers": answers}


# ---------------------------------------------------------------- report


def cpu_line() -> str:
    from mlflow_finetune_plugin.models.precision import cpu_flags

    flags = cpu_flags()
    has = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx512_bf16", "amx_bf16", "amx_tile"))
    return (f"CPU flags: {has} (bf16 matmuls run natively only with them; without, bf16 is emulated and "
            "slower).")


def report(args, results: dict, versions: dict, recipe) -> None:
    what = f"{args.steps} steps" if args.steps else f"{recipe.train.epochs:g} epochs"
    common.header(
        f"Peer comparison, the project against LLaMA-Factory {LF_VERSION}: smollm2 LoRA r={recipe.adapter.r} "
        f"on support-bot, {what} of {recipe.train.batch_size} packed rows of up to "
        f"{recipe.data.max_length} tokens, {args.precision}, {args.reps} rep(s): median (range)")
    print(cpu_line())
    print("LLaMA-Factory's environment: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".\n")
    cols = [("steps", "steps"), ("packed rows / epoch", "packed_rows"), ("s/step", "s_per_step"),
            ("tokens/s (non-padding)", "tokens_per_s"), ("non-padding tokens", "tokens"),
            ("peak RSS, training (GiB)", "train_peak_gib"), ("peak RSS, command (GiB)", "peak_gib"),
            ("command wall (s)", "wall"), ("rougeL", "rougeL"),
            ("exact", "exact")]
    rows = [[side, *(common.summary(r.get(key) for r in results[side]) for _, key in cols)] for side in SIDES]
    project, peer = results["project"], results["LLaMA-Factory"]
    rows.append(["project / LLaMA-Factory", *(common.summary(common.ratios([r.get(key) for r in project],
                                                                            [r.get(key) for r in peer]))
                                              for _, key in cols)])
    print(common.table(["tool", *(name for name, _ in cols)], rows))
    print(f"\nHeld-out rows: the first {args.examples} of {Path(recipe.data.eval).name}, greedy, up to "
          f"{recipe.eval.max_new_tokens} new tokens. LLaMA-Factory's training YAML: {peer[-1]['config']}.")
    for note in sorted({f"{side}: {r['note']}" for side in SIDES for r in results[side] if r.get("note")}):
        print(note)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=0,
                   help="Cap both tools at this many steps (default: the recipe's "
                        "epochs, each tool's own number of packed rows).")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                   help="Both tools' training precision (bf16: Trainer's autocast over fp32 weights on a "
                        "CPU).")
    p.add_argument("--examples", type=int, default=None,
                   help="Held-out rows scored (default: eval.max_examples).")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--setup", action="store_true", help="Make LLaMA-Factory's environment again first.")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.models.base import resolve_model_path

    work, env = common.setup(args.workdir)
    versions = setup_venv(args.setup, work / "logs" / "llamafactory-setup.log")
    recipe = load_recipe(common.SUPPORT_BOT, method="lora", overrides={"data.replay": "false"})
    args.examples = args.examples or recipe.eval.max_examples
    model_dir = str(resolve_model_path(recipe.model.name))
    prompts, references = held_out(recipe, args.examples)
    results = {side: [] for side in SIDES}
    for rep in range(args.reps):
        for side in common.rotated(list(SIDES), rep):
            common.log(f"rep {rep + 1}/{args.reps}: {side}")
            tag = f"peer-{'llamafactory' if side == 'LLaMA-Factory' else 'project'}-{rep}"
            r = (run_llamafactory(recipe, model_dir, args, env, work, tag) if side == "LLaMA-Factory"
                 else run_project(args, env, work, tag))
            r.update(s_per_step=r["seconds"] / r["steps"], peak_gib=r["peak_rss"] / 2**30,
                     train_peak_gib=r["train_peak_rss"] / 2**30)
            common.log(f"  {r['steps']} steps, {r['tokens']:.0f} tokens in {r['seconds']:.1f} s = "
                       f"{r['tokens_per_s']:.0f} tokens/s; peak RSS {r['train_peak_gib']:.2f} GiB training, "
                       f"{r['peak_gib']:.2f} GiB the command; wall {r['wall']:.0f} s")
            r.update(score_adapter(model_dir, r["adapter"], recipe, prompts, references, side))
            common.log(f"  rougeL {r['rougeL']:.3f}, exact {r['exact']:.3f} on {len(prompts)} held-out rows")
            results[side].append(r)
    report(args, results, versions, recipe)


if __name__ == "__main__":
    main()
