r"""The memory plan against a GPU's measured peak, on models built from the published Llama-3.1-8B,
Qwen3-8B and Mistral-7B-Instruct-v0.3 configurations (tests/fixtures/*/config.json; random weights, nothing
downloaded): LoRA on a bf16 base and QLoRA on a 4-bit NF4 base (double quantization; the adapter of
recipes/qlora-8b: r=16, alpha 32, dropout 0.05, all-linear, sdpa), rows of 2,048 and 4,096 tokens, with and
without gradient checkpointing.

Each case (model, method, row length, checkpointing):
- planned: `memory.plan.plan` (the function `mlflow-finetune plan` prints) for the recipe the case trains,
  loaded by `config.loading.load_recipe` as the command loads it, at each batch size from 1 up;
- a budget: a card that holds B rows and not one more, halfway between the plan's peaks at B and B + 1 rows,
  B the most rows (at most --step-tokens / row length) the plan fits on this GPU; `--memory 40GiB` gives
  every case that budget instead (B then the most rows the plan fits in it: slower steps). The plan's own
  `train.batch_size: auto` choice for the budget is recorded beside it (a power of two, at most B);
- the budget is enforced: `torch.cuda.set_per_process_memory_fraction` caps the caching allocator at the
  budget less the CUDA context measured in this process, so that the 139 GiB card behaves as the budget's;
- run 1, B rows: must run; its `torch.cuda.max_memory_allocated` (peak stats reset first, the base's weights
  held) against the plan's peak at B. The plan's peak as printed holds the CUDA context (600 MiB) and 5% for
  the allocator, and is what the fit compares with a card; `planned_tensors_gib` is it without them. The
  error is planned / measured - 1, the goal within 10%;
- run 2, B + 1 rows: must not fit (out of memory), or its peak (with the context) must come within 10% of
  the budget. Where batch 1 does not fit this GPU at all, the plan's figure is recorded and batch 1 is run to
  see it fail.

How a run trains: the plugin's own path from a loaded base on, as train/pipeline.py runs it, in this process:
`kernels.apply_layers` (train.kernels, `none` by default here: the plan does not model Liger's kernels),
`templates.fit_model`, `attach(quantization.prepare(model))`, `lora.no_casts_under_autocast`, then the SFT
objective's `build_trainer` (TRL's SFTTrainer as the plugin configures it: `trainers.training_arguments`,
bf16, the fused LM head of `train.fused_lm_head: auto`) and `trainer.train()` for --steps steps, on rows
longer than the row length (every row cut to it, the loss on the long answers). What differs from `mlflow
run`: the base is built in memory instead of read from a folder (random weights from the config, on the GPU,
at the dtype `load_base_model` uses; for QLoRA those weights go through the model class's
`from_pretrained(None, config=..., state_dict=...)` with the plugin's own `quantization.model_kwargs`, the
BitsAndBytesConfig and device map `load_base_model` passes), the tokenizer is the built-in tiny model's (its
ids are within every vocabulary; only the rows' length matters here), and there is no MLflow run, evaluation
or checkpoint. One base per (model, method) serves its four cases, in a process of its own (an out-of-memory
run cannot leave memory behind for another group); gradient checkpointing and the input-gradient hook are
reset before each run, so that each trainer gets the base as the pipeline hands it over. AdamW's states exist
from the first update on, so the second step holds everything the plan counts: --steps 2 by default.

Order (most valuable first, so that a deadline cuts the least): Llama QLoRA (recipes/qlora-8b), Llama LoRA,
Qwen3 QLoRA and LoRA, Mistral LoRA and QLoRA; in each, 2,048 tokens with and without checkpointing, then
4,096. A row goes to $OUT/results.jsonl after every run (a timeout keeps what ran), the table to stdout and
$OUT/table.md after every group. --deadline-s (from this script's start) skips what no longer fits; a run
whose planned batch ran out of memory is not followed by the larger one.

Time on an H200 (estimated, not yet measured): a group's process with its imports about 10 s; an 8B bf16
base built on the GPU in seconds, a 4-bit one through `from_pretrained` in about 10-20 s; a step of 8,192
tokens on an 8B model about 1-1.5 s (LoRA about 8k tokens/s; QLoRA and checkpointing slower), so a run of 2
steps about 8 s with its trainer's set-up and its first step's kernels; a group (4 cases, 8 runs) about 80 s,
all six about 8 minutes. One call with a 300 s deadline covers the first three or four groups; the next call
(`--models qwen3-8b,mistral-7b`, or what the first reports skipped) the rest.

Device commands, one call each (the run tool's timeout_s about 90 s above the deadline: unpacking, the last
run, the tables). The carry: `LLAMAFACTORY=1 PANDAS=0 bash bench/gpu/prepare_carry.sh` (PY_VERSION=3.X where
the device's Python is not 3.12) holds bitsandbytes for QLoRA and LLaMA-Factory's libraries for the
throughput call, so one carry, `.gpu_carry.tar.xz`, serves both:
    BENCH=memory DEADLINE_S=300 bash bench/gpu/run_on_device.sh
    DEADLINE_S=400 bash bench/gpu/run_on_device.sh --config tests/fixtures/llama-3.1-8b-instruct/config.json \
      --methods lora,qlora --sides plugin,plain,llamafactory --reps 1 --warmup 3 --timed 10 --profile-step -1
(the second: the throughput on the 8B shape, bench/gpu/train_throughput.py's docstring)
    python bench/gpu/memory_plan_check.py           # on a GPU (run_on_device.sh runs it there)
    python bench/gpu/memory_plan_check.py --tiny    # CPU smoke test of the same code: 2 small layers, fp32,
                                                    # rows of 128 and 256, no cap (checks the pipeline only)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

START = time.time()
GIB = 2**30
FIXTURES = common.REPO / "tests" / "fixtures"
MODELS = {"llama-3.1-8b": "llama-3.1-8b-instruct", "qwen3-8b": "qwen3-8b",
          "mistral-7b": "mistral-7b-instruct-v0.3"}
GROUPS = (("llama-3.1-8b", "qlora"), ("llama-3.1-8b", "lora"), ("qwen3-8b", "qlora"), ("qwen3-8b", "lora"),
          ("mistral-7b", "lora"), ("mistral-7b", "qlora"))
ADAPTER = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}  # recipes/qlora-8b's
# --tiny: each configuration cut to this (CPU smoke test)
TINY = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 8192, "max_window_layers": 2,
        "bos_token_id": 1, "eos_token_id": 2}
MAX_BATCH = 64


def config_folder(model: str, tiny: bool, work: Path) -> Path:
    """The fixture's folder, or (--tiny) a copy of its config cut to 2 small layers."""
    fixture = FIXTURES / MODELS[model]
    if not tiny:
        return fixture
    out = work / "configs" / model
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(json.loads((fixture / "config.json").read_text()) | TINY))
    return out


def project_folder(work: Path) -> Path:
    """The project every case's recipe is loaded from (its rows are written for each run: `write_rows`)."""
    import yaml

    folder = work / "project"
    write_rows(folder, 1, 16)
    (folder / "finetune.yaml").write_text(yaml.safe_dump({
        "data": {"train": "train.jsonl", "format": "chat"}, "adapter": ADAPTER,
        "eval": {"enabled": False}, "registry": {"enabled": False}}, sort_keys=False))
    return folder


def write_rows(project: Path, n: int, length: int) -> None:
    """`n` rows, each longer than `length` tokens (cut to it): every step a full batch of full rows."""
    common.write_jsonl(project / "train.jsonl", common.chat_rows(n, seed=7, mean_words=length * 2, sigma=0.01,
                                                                 max_words=length * 3))


class Planner:
    """One case's recipe and plan at any batch size, as `mlflow-finetune plan PROJECT -e METHOD -P ...`."""

    def __init__(self, project: Path, config: Path, method: str, seq: int, ckpt: bool, args, on_gpu: bool):
        self.project, self.method, self.seq, self.on_gpu = project, method, seq, on_gpu
        self.over = {"model.name": str(config), "model.attn_implementation": "sdpa",
                     "data.max_length": str(seq), "data.packing": "false", "train.grad_accum": "1",
                     "train.gradient_checkpointing": str(ckpt).lower(), "train.kernels": args.kernels,
                     "train.max_steps": str(args.steps), "train.logging_steps": "100000",
                     "train.save_steps": "100000", **({} if on_gpu else {"train.precision": "fp32"})}
        self.peaks: dict[int, int] = {}

    def recipe(self, batch):
        from mlflow_finetune_plugin.config.loading import load_recipe

        return load_recipe(self.project, method=self.method,
                           overrides={**self.over, "train.batch_size": str(batch)})

    def plan(self, batch, memory: int | None = None):
        from mlflow_finetune_plugin.memory.plan import plan

        return plan(self.recipe(batch), device_memory=memory, device="cuda" if self.on_gpu else "cpu",
                    longest=self.seq, overhead=None if self.on_gpu else 0)

    def peak(self, batch: int) -> int:
        if batch not in self.peaks:
            self.peaks[batch] = self.plan(batch).peak
        return self.peaks[batch]

    def budget(self, args, total: int | None) -> tuple[int, int]:
        """(the budget in bytes, B: the most rows the plan fits in it; 0 where batch 1 does not fit)."""
        from mlflow_finetune_plugin.memory.sizes import parse_size

        room = total or float("inf")
        if args.memory:
            budget = int(min(parse_size(args.memory), room))
            batch = 0
            while batch < MAX_BATCH and self.peak(batch + 1) <= budget:
                batch += 1
            return budget, batch
        target, batch = max(1, args.step_tokens // self.seq), 0
        while batch < target and self.peak(batch + 1) <= room:
            batch += 1
        if batch == 0:
            return int(room), 0
        return int(min((self.peak(batch) + self.peak(batch + 1)) / 2, room)), batch


class Device:
    """Where the runs happen: the GPU (its total memory, the CUDA context this process holds, the cap), or the
    CPU (peak resident memory above this process's own before the base was built)."""

    def __init__(self, on_gpu: bool):
        import torch

        from mlflow_finetune_plugin.runtime.allocator import rss_bytes

        self.cuda = on_gpu
        if on_gpu:
            torch.zeros(1, device="cuda")
            free, self.total = torch.cuda.mem_get_info()
            self.context = self.total - free - torch.cuda.memory_reserved()
            self.name = torch.cuda.get_device_name(0)
        else:
            import mlflow  # noqa: F401 - the training process's libraries, loaded before the baseline
            import trl  # noqa: F401

            import mlflow_finetune_plugin.train.objectives.sft_trainer  # noqa: F401

            gc.collect()
            self.total, self.context, self.name = None, 0, "CPU smoke test, not a GPU result"
            self.baseline = rss_bytes()

    def start(self, budget: int) -> int:
        """Before a run: memory released, the cap set, the peak reset; the memory held now."""
        import torch

        gc.collect()
        if not self.cuda:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM from here
            return 0
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, max(0.0, budget - self.context) / self.total))
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def finish(self, model, held: int) -> dict:
        """After a run: its peak; then the run's memory released and the cap lifted."""
        import torch

        from mlflow_finetune_plugin.runtime.allocator import peak_rss_bytes

        if not self.cuda:
            model.zero_grad(set_to_none=True)
            return {"measured_gib": (peak_rss_bytes() - self.baseline) / GIB}
        row = {"measured_gib": torch.cuda.max_memory_allocated() / GIB,
               "reserved_gib": torch.cuda.max_memory_reserved() / GIB, "held_before_gib": held / GIB}
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        row["left_after_run_gib"] = (torch.cuda.memory_allocated() - held) / GIB
        torch.cuda.set_per_process_memory_fraction(1.0)
        return row


def build(recipe, on_gpu: bool):
    """The base with random weights, loaded as `load_base_model` loads it, then the pipeline's steps up to the
    trainer: kernels, the tokenizer's fit, quantization's preparation, the adapter. (model, tokenizer)"""
    import torch
    import transformers

    from mlflow_finetune_plugin.models import kernels
    from mlflow_finetune_plugin.models.base import load_tokenizer, torch_dtype
    from mlflow_finetune_plugin.train import quantization, templates
    from mlflow_finetune_plugin.train.adapters import attach, lora

    config = transformers.AutoConfig.from_pretrained(recipe.model.name)
    dtype, attention = torch_dtype(recipe.model.dtype), recipe.model.attn_implementation
    loading = quantization.model_kwargs(recipe.model)
    torch.manual_seed(0)
    with torch.device("cuda" if on_gpu else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                              attn_implementation=attention)
    if loading:  # 4-bit: the same weights through from_pretrained, quantized as a base loaded from a folder
        cls, state = type(model), model.state_dict()
        del model
        try:
            model = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                        attn_implementation=attention, **loading)
        except Exception as e:  # noqa: BLE001 - said, then the weights as a checkpoint file holds them
            common.log(f"from_pretrained with the GPU's state dict failed ({type(e).__name__}: {e}); "
                       "again from host memory")
            state = {k: v.cpu() for k, v in state.items()}
            model = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                        attn_implementation=attention, **loading)
        del state
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    kernels.apply_layers(model, kernels.resolve(recipe, model.config))
    tokenizer = load_tokenizer("tiny")
    trainable = templates.fit_model(recipe, model, tokenizer, main=False)
    model = attach(quantization.prepare(model, recipe.model), recipe, trainable)
    if recipe.adapter.type == "lora":
        lora.no_casts_under_autocast(model)
    return model, tokenizer


def fresh(model) -> None:
    """The base as the pipeline hands it to a trainer: no checkpointing, no input-gradient hook (a trainer
    with checkpointing turns both on; PEFT's k-bit preparation leaves them off)."""
    base = model.get_base_model()
    # transformers >= 5.23 names it activation checkpointing (trainers.checkpointing_argument)
    off = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
    off()
    for m in (model, base):
        if "_require_grads_hook" in vars(m):
            m._require_grads_hook.remove()
            del m._require_grads_hook


def train_once(recipe, model, tokenizer, dev: Device, budget: int, work: Path) -> dict:
    """One run of the plugin's SFT trainer under the cap: its peak, or where it ran out of memory."""
    import torch

    from mlflow_finetune_plugin.data import splits
    from mlflow_finetune_plugin.train import trainers
    from mlflow_finetune_plugin.train.objectives import objective_of

    fresh(model)
    train = recipe.train
    write_rows(Path(recipe.project_dir), train.batch_size * train.max_steps, recipe.data.max_length)
    data = splits.load_splits(recipe)
    targs = trainers.training_arguments(recipe, "memory-plan-check", None)
    targs.update(output_dir=str(work / "trainer"), save_strategy="no", disable_tqdm=True)
    row: dict = {}
    held = dev.start(budget)
    started, trainer = time.time(), None
    try:
        trainer = objective_of(recipe).build_trainer(recipe, model, tokenizer, data.train, None, targs, [])
        trainer.train()
        row["steps"] = trainer.state.global_step
    except (torch.OutOfMemoryError, RuntimeError) as e:
        # cuBLAS and some kernels say it as a RuntimeError of their own
        if not isinstance(e, torch.OutOfMemoryError) and not re.search(r"out of memory|ALLOC_FAILED", str(e)):
            raise
        step = trainer.state.global_step + 1 if trainer is not None else 0
        row["oom"] = f"out of memory in step {step}: {str(e).splitlines()[0][:160]}"
    finally:
        if trainer is not None:
            trainers.trained(trainer)  # accelerate's autocast wrapper off the forward, as after training
    del trainer
    row["seconds"] = round(time.time() - started, 1)
    return {**row, **dev.finish(model, held)}


def judged(row: dict, planned: int, dev: Device) -> dict:
    """The case's figures and checks on a run's row."""
    from mlflow_finetune_plugin.memory.plan import ALLOCATOR_SLACK, CUDA_CONTEXT

    row["planned_gib"] = planned / GIB
    if dev.cuda:
        row["planned_tensors_gib"] = (planned / (1 + ALLOCATOR_SLACK) - CUDA_CONTEXT) / GIB
    measured = row.get("measured_gib")
    if "oom" not in row and measured:
        row["error_pct"] = round(100 * (planned / GIB / measured - 1), 1)
        if dev.cuda:  # the plan without its context and allocator share, against the tensors alone
            row["error_tensors_pct"] = round(100 * (row["planned_tensors_gib"] / measured - 1), 1)
    if not dev.cuda:
        row["check"] = "n/a on CPU (no cap)"
    elif row["run"] == "planned":
        row["check"] = ("FAIL: out of memory at the planned batch" if "oom" in row else
                        "ok" if abs(row["error_pct"]) <= 10 else "runs; plan off by more than 10%")
    elif "oom" in row:
        row["check"] = "ok: one more row does not fit"
    else:
        used = (measured * GIB + dev.context) / row["budget_gib"] / GIB
        row["check"] = f"{'ok' if used >= 0.9 else 'FAIL'}: one more row fits, {used:.0%} of the budget"
    return row


def run_group(args) -> None:
    """--child MODEL:METHOD: one base, its cases in order, a row after each run."""
    import torch

    model_name, method = args.child.split(":")
    on_gpu = torch.cuda.is_available()
    work, out = Path(args.workdir), Path(args.out)
    dev = Device(on_gpu)
    config = config_folder(model_name, args.tiny, work)
    project = project_folder(work)
    cases = [(seq, ckpt) for seq in args.seqs for ckpt in args.checkpointing]
    started = time.time()
    model, tokenizer = build(Planner(project, config, method, max(args.seqs), False, args, on_gpu).recipe(1),
                             on_gpu)
    common.log(f"{model_name} {method}: built in {time.time() - started:.0f} s")
    base = {"session": args.session, "device": dev.name, "model": model_name, "method": method,
            "built_s": round(time.time() - started, 1), "context_gib": dev.context / GIB, "steps": args.steps,
            "kernels": args.kernels}
    took: list[float] = []  # runs' seconds: the longest is what the next one may need
    for seq, ckpt in cases:
        planner = Planner(project, config, method, seq, ckpt, args, on_gpu)
        budget, batch = planner.budget(args, dev.total)
        choice = planner.plan("auto", memory=budget).choice
        case = {**base, "seq": seq, "checkpointing": ckpt, "budget_gib": budget / GIB,
                "plan_choice": f"{choice.batch_size} x {choice.max_length}" if choice else None}
        row: dict = {}
        for role, rows in ([("planned", batch)] if batch else []) + [("one more", batch + 1)]:
            row_before, row = row, {**case, "run": role, "batch": rows}
            if role == "one more" and "oom" in row_before:
                row.update(check="skipped: the planned batch ran out of memory already")
            elif time.time() + max(took, default=30.0 if on_gpu else 5.0) > args.deadline_at:
                row.update(check="skipped: the deadline", planned_gib=planner.peak(rows) / GIB)
            else:
                try:
                    row.update(train_once(planner.recipe(rows), model, tokenizer, dev, budget, work))
                    took.append(row["seconds"] + 2)
                    judged(row, planner.peak(rows), dev)
                except Exception as e:  # noqa: BLE001 - recorded; the next case still runs
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            common.log(f"{model_name} {method} {seq} ckpt={ckpt} {role} batch {rows}: "
                       f"{row.get('check') or row.get('error')}")


def report(rows: list[dict]) -> str:
    def gib(v):
        return f"{v:.2f}" if isinstance(v, (int, float)) else "-"

    cases: dict = {}
    for r in rows:
        cases.setdefault((r["model"], r["method"], r["seq"], r["checkpointing"]), {})[r["run"]] = r
    out = []
    for (model, method, seq, ckpt), runs in cases.items():
        first, more = runs.get("planned", {}), runs.get("one more", {})
        any_row = first or more
        err = first.get("error_pct")
        out.append([f"{model} {method} {seq} {'ckpt' if ckpt else 'no ckpt'}", gib(any_row.get("budget_gib")),
                    f"{first.get('batch', 0)} ({any_row.get('plan_choice')})", gib(first.get("planned_gib")),
                    gib(first.get("measured_gib")), f"{err:+.1f}%" if err is not None else "-",
                    first.get("check") or first.get("error") or "does not fit at batch 1 (planned)",
                    f"{more.get('batch')}: {more.get('check') or more.get('error') or '-'} (planned "
                    f"{gib(more.get('planned_gib'))}, measured {gib(more.get('measured_gib'))} GiB)"])
    return common.table(["case", "budget GiB", "B (plan's auto)", "planned GiB", "measured GiB", "error",
                         "B rows", "B + 1 rows"], out)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: 2-layer configs, rows of 128/256.")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--methods", default="qlora,lora")
    p.add_argument("--seqs", default=None, help="Row lengths. Default: 2048,4096 (GPU), 128,256 (--tiny).")
    p.add_argument("--checkpointing", default="on,off")
    p.add_argument("--steps", type=int, default=2, help="Training steps a run.")
    p.add_argument("--step-tokens", type=int, default=None,
                   help="Tokens a step of the planned batch holds at most. Default: 8192, 512 (--tiny).")
    p.add_argument("--memory", default=None, help="One budget for every case (40GiB); default: per case.")
    p.add_argument("--kernels", default="none", choices=["none", "auto", "liger"], help="train.kernels.")
    p.add_argument("--deadline-s", type=float, default=480.0,
                   help="Seconds from this script's start after which no run starts.")
    p.add_argument("--out", default=os.environ.get("OUT"), help="Results folder. Default: $OUT or workdir.")
    p.add_argument("--workdir", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--session", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline-at", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.seqs = [int(s) for s in (args.seqs or ("128,256" if args.tiny else "2048,4096")).split(",")]
    args.checkpointing = [c == "on" for c in args.checkpointing.split(",")]
    args.step_tokens = args.step_tokens or (512 if args.tiny else 8192)
    args.deadline_at = args.deadline_at or START + args.deadline_s
    return args


def child_argv(args, model: str, method: str, work: Path, out: Path, session: str) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", f"{model}:{method}",
            "--session", session, "--deadline-at", str(args.deadline_at), "--workdir", str(work),
            "--out", str(out),
            "--seqs", ",".join(map(str, args.seqs)), "--steps", str(args.steps),
            "--checkpointing", ",".join("on" if c else "off" for c in args.checkpointing),
            "--step-tokens", str(args.step_tokens), "--kernels", args.kernels]
    return argv + (["--tiny"] if args.tiny else []) + (["--memory", args.memory] if args.memory else [])


def main(argv=None):
    args = parse(argv)
    if args.child:
        return run_group(args)
    import torch

    if not torch.cuda.is_available() and not args.tiny:
        sys.exit("No CUDA GPU here: run with --tiny for the CPU smoke test.")
    work, env = common.setup(args.workdir)
    out = Path(args.out or work / "out").resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    session = f"{START:.0f}"
    groups = [(m, k) for m, k in GROUPS if m in args.models.split(",") and k in args.methods.split(",")]
    least = 60 if not args.tiny else 5  # a group's process, imports and base before its first run
    for model, method in groups:
        left = args.deadline_at - time.time()
        log = out / "logs" / f"{model}-{method}.log"
        if left < least:
            common.log(f"{model} {method}: skipped, {left:.0f} s left before the deadline")
            continue
        common.log(f"{model} {method} ({left:.0f} s left)")
        with open(log, "w") as f:
            proc = subprocess.Popen(child_argv(args, model, method, work, out, session), env=env, cwd=work,
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout=left + 30)  # the child stops starting runs at the deadline itself
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.returncode:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            common.log(f"{model} {method}: exit {proc.returncode}:\n  " + "\n  ".join(tail))
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()
                if line.strip()] if (out / "results.jsonl").exists() else []
        table = report([r for r in rows if r.get("session") == session])
        (out / "table.md").write_text(table + "\n")
        print(table, flush=True)
    common.header(f"The memory plan against measured memory ({'--tiny, CPU' if args.tiny else 'GPU'}), "
                  f"--steps {args.steps}, train.kernels {args.kernels}")
    print((out / "table.md").read_text() if (out / "table.md").exists() else "no case ran")
    print(f"\nresults: {out / 'results.jsonl'}; {time.time() - START:.0f} s in all")


if __name__ == "__main__":
    main()
