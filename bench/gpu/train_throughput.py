r"""GPU training throughput: the plugin (train.kernels auto) vs plain transformers + PEFT, with and without
Liger.

The model is built from a config with random weights (hidden 2048, 16 layers, 32 heads, intermediate 5632,
vocabulary 32000: ~1.0B parameters, bf16), or from a published config.json with --config (the 8B shape:
tests/fixtures/llama-3.1-8b-instruct/config.json), and the built-in tiny model's tokenizer and chat template:
nothing is downloaded. Every row is longer than the sequence length and truncated to it, so every batch is
exactly batch x seq_len tokens on every side (packing off). Sides, per method (lora, qlora) and repetition, in
rotated order:
  plugin              mlflow run PROJECT -e METHOD --backend finetune (train.kernels, fused_lm_head: auto)
  plugin+compile      the same with train.torch_compile: true (each decoder layer under torch.compile)
  plain               bench/plain_train.py --method METHOD --precision bf16 (transformers Trainer + PEFT /
                      bitsandbytes)
  plain+liger         the same with `use_liger_kernel=True` (Liger's defaults, fused linear cross-entropy)
  llamafactory        LLaMA-Factory 0.9.5 (bench/llamafactory_train.py, LoRA only) on the same model and rows,
                      the same LoRA, optimizer and batch settings, and its own defaults for the rest: gradient
                      checkpointing on, sdpa attention, the chat template parsed from the tokenizer, bf16
  llamafactory+liger  the same with its `enable_liger_kernel: true`
LLaMA-Factory runs on its own pinned libraries (transformers, peft, trl, datasets, accelerate): with the
Python of $BENCH_LF_PYTHON (default: bench/peer_llamafactory.py's virtual environment where it exists, else
this Python), and $BENCH_LF_SITE first on its path where set (on the device: run_on_device.sh unpacks them
there when bench/gpu/prepare_carry.sh packed them with LLAMAFACTORY=1); nothing of this repository is on its
path. Each side is its own process. Timing is the same on every side (bench/gpu/probe/sitecustomize.py wraps
`Trainer.training_step`): the first --warmup steps are excluded (start-up, autotuning, allocator warm-up),
then --timed steps are timed between two `cuda.synchronize()` calls. Reported: tokens/s over that window, the
process's peak CUDA memory (`max_memory_allocated`), the most `nvidia-smi` showed in use (context included),
MFU, and ratios to plain. In the first repetition one LoRA step of each side (inside the warm-up) runs under
`torch.profiler`: its top ops by GPU time go to $OUT/profile-<side>.txt.

Budget (one device call of at most ~9 minutes, two repetitions, 12 sides): 200 timed steps a side would be 12
x 200 x ~0.2 s = 8 minutes of training alone, before any start-up. So each side trains --warmup 10 + --timed
60 steps (+1 to close the window): the issue's 200 steps are cut to 60 timed steps after a 10-step warm-up,
the same on every side. A global deadline (--deadline-s, from this script's start) skips the sides that no
longer fit instead of overrunning; a side that fails is recorded with its log's tail and the others go on.
Results are appended to $OUT/results.jsonl after every side and the table so far is printed.

The 8B shape (--config), QLoRA and LoRA at 2,048 tokens, batch 4, against plain and LLaMA-Factory: a side
is estimated (not yet measured) at about 60 s of start-up (the 1B sides' 45-60 s, and 16 GB of weights to
load) plus 1-1.5 s a step, so one repetition of 3 warm-up and 10 timed steps, five sides, in one call of
about 7 minutes, the model's build and save (16 GB on the device's disk) included; LoRA's sides first (the
LLaMA-Factory side is LoRA only), QLoRA's after, cut by the deadline where they do not fit. The carry holds
LLaMA-Factory's libraries and bitsandbytes together (`LLAMAFACTORY=1 PANDAS=0 bash
bench/gpu/prepare_carry.sh`); the device command, after bench/gpu/memory_plan_check.py's:
    DEADLINE_S=400 bash bench/gpu/run_on_device.sh --config tests/fixtures/llama-3.1-8b-instruct/config.json \
      --methods lora,qlora --sides plugin,plain,llamafactory --reps 1 --warmup 3 --timed 10 --profile-step -1

    python bench/gpu/train_throughput.py                  # on a GPU; bench/gpu/run_on_device.sh runs it there
    python bench/gpu/train_throughput.py --tiny --reps 1  # CPU smoke test: tiny model, seq 128, a few steps
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

START = time.monotonic()
PROBE = Path(__file__).resolve().parent / "probe"
METHODS = ("lora", "qlora")
SIDES = ("plugin", "plugin+compile", "plain", "plain+liger", "llamafactory", "llamafactory+liger")
LR = {"lora": 2e-4, "qlora": 2e-4}
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 64, "vocab_size": 32000,
            "max_position_embeddings": 4096, "tie_word_embeddings": False, "initializer_range": 0.02}


def build_model(root: Path, config_file: Path | None = None) -> Path:
    """The ~1B Llama, or the model of `config_file` (a published config.json: --config), with seeded random
    bf16 weights built on the GPU once, and the tiny model's tokenizer files (its special-token ids replace
    the config's; the vocabulary stays the config's)."""
    name = config_file.parent.name if config_file else "llama-1b"
    out = root / f"{name}-bf16"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from mlflow_finetune_plugin.models.tiny import tiny_model_path

    tiny = Path(tiny_model_path())
    config = json.loads((tiny / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        torch.manual_seed(0)
        if config_file is None:
            model = LlamaForCausalLM(LlamaConfig(**{**config, **LLAMA_1B,
                                                    "dtype": "bfloat16"})).to(torch.bfloat16)
        else:
            ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
            published = {**json.loads(config_file.read_text()), **ids}
            published = {k: v for k, v in published.items() if k not in ("torch_dtype", "dtype")}
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**published), dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    del model
    torch.cuda.empty_cache()
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens", "generation_config")):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


def project(work: Path, method: str, args, data: Path, compiled: bool = False) -> Path:
    """The plugin side's project folder: a finetune.yaml with the same settings as the plain side's
    arguments."""
    import yaml

    recipe = {"method": method, "data": {"train": str(data), "format": "chat", "max_length": args.seq_len,
                                         "packing": False},
              "train": {"max_steps": args.total_steps, "batch_size": args.batch_size,
                        "learning_rate": LR[method], "lr_scheduler": "cosine", "warmup_ratio": 0.05,
                        "logging_steps": 10, "save_steps": args.total_steps + 1000, "seed": 42,
                        "torch_compile": compiled}, "eval": {"enabled": False},
              "registry": {"enabled": False}}
    recipe[method] = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    folder = work / "projects" / f"gpu-{method}{'-compile' if compiled else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "finetune.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return folder


class GpuMemory:
    """The most GPU memory in use (MiB, `nvidia-smi`) while the `with` block runs; None without a GPU."""

    def __enter__(self):
        self.peak, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.5):
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True).stdout.strip()
            if out.isdigit():
                self.peak = max(self.peak or 0, int(out))

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def llamafactory_python() -> str:
    from peer_llamafactory import lf_python

    return os.environ.get("BENCH_LF_PYTHON") or (str(lf_python()) if lf_python().exists() else sys.executable)


def llamafactory_config(method: str, args, model: Path, data: Path, work: Path, liger: bool) -> Path:
    """LLaMA-Factory's training YAML for the same model, rows and settings as the plugin's project (LoRA)."""
    import yaml
    from peer_llamafactory import llamafactory_dataset

    folder = work / "llamafactory" / f"{method}{'-liger' if liger else ''}"
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    config = {
        "model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target": "all",
        "dataset": llamafactory_dataset(rows, folder / "data"), "dataset_dir": str(folder / "data"),
        "cutoff_len": args.seq_len, "packing": False, "overwrite_cache": True, "enable_liger_kernel": liger,
        "output_dir": str(folder / "out"), "overwrite_output_dir": True, "save_strategy": "no",
        "plot_loss": False, "report_to": "none", "logging_steps": 10,
        "per_device_train_batch_size": args.batch_size, "learning_rate": LR[method],
        "max_steps": args.total_steps, "lr_scheduler_type": "cosine", "warmup_steps": 0.05, "seed": 42,
        "bf16": args.precision == "bf16", "use_cpu": args.precision != "bf16",
    }
    (folder / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder / "train.yaml"


def side_command(side: str, method: str, args, model: Path, data: Path, work: Path) -> list[str]:
    if side.startswith("llamafactory"):
        config = llamafactory_config(method, args, model, data, work, liger=side.endswith("+liger"))
        return [llamafactory_python(), str(common.REPO / "bench" / "llamafactory_train.py"), str(config)]
    if side.startswith("plugin"):
        folder = project(work, method, args, data, compiled=side == "plugin+compile")
        return [sys.executable, "-m", "mlflow", "run", str(folder), "-e", method,
                "--backend", "finetune", "--env-manager", "local", "-P", f"model={model}"]
    argv = [sys.executable, str(common.REPO / "bench" / "plain_train.py"), "--output-dir",
            str(work / "plain-out"), "--model", str(model), "--data", str(data), "--method", method,
            "--precision", args.precision, "--max-length", str(args.seq_len), "--batch-size",
            str(args.batch_size), "--steps", str(args.total_steps), "--lr", str(LR[method]),
            "--logging-steps", "10"]
    return argv + (["--liger"] if side == "plain+liger" else [])


def run_side(side: str, method: str, rep: int, args, model: Path, data: Path, env: dict, work: Path,
             timeout: float) -> dict:
    """One side in its own process (its own session, killed whole on timeout): the probe's figures, or why
    not."""
    name = f"{method}-{side.replace('+', '-')}-{rep}"
    probe_file = work / "probe" / f"{name}.json"
    probe_file.parent.mkdir(parents=True, exist_ok=True)
    probe_file.unlink(missing_ok=True)
    profile = rep == 0 and method == "lora" and args.profile_step >= 0
    side_env = {**env, "BENCH_PROBE": str(probe_file), "BENCH_PROBE_WARMUP": str(args.warmup),
                "BENCH_PROBE_TIMED": str(args.timed), "BENCH_PROBE_PROFILE": str(args.profile_step),
                "BENCH_PROBE_PROFILE_OUT": str(args.out
                                               / f"profile-{side.replace('+', '-')}.txt") if profile else "",
                "PYTHONPATH": os.pathsep.join([str(PROBE), env["PYTHONPATH"]])}
    # its own libraries only: the probe, then its pinned ones where carried
    if side.startswith("llamafactory"):
        side_env.update(PYTHONPATH=os.pathsep.join([str(PROBE),
                                                    *filter(None, [os.environ.get("BENCH_LF_SITE")])]),
                        HF_DATASETS_CACHE=str(work / "llamafactory" / "datasets-cache"))
    log_file = args.out / "logs" / f"{name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    row = {"method": method, "side": side, "rep": rep, "log": str(log_file)}
    started = time.monotonic()
    with GpuMemory() as mem, open(log_file, "w") as log:
        proc = subprocess.Popen(side_command(side, method, args, model, data, work), env=side_env, cwd=work,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            row["error"] = f"killed after {timeout:.0f} s (the deadline)"
    row.update(wall_s=round(time.monotonic() - started, 1), exit=proc.returncode,
               nvidia_smi_peak_mib=mem.peak)
    if probe_file.exists():
        row.update(json.loads(probe_file.read_text()))
    elif "error" not in row:
        tail = log_file.read_text(errors="replace").splitlines()[-15:]
        row["error"] = f"exit {proc.returncode}, no timing: " + " | ".join(tail)[-1500:]
    return row


def skip_reason(side: str, method: str, on_gpu: bool) -> str | None:
    if side.startswith("llamafactory"):
        if method != "lora":
            return "skipped: the LLaMA-Factory side mirrors LoRA only"
        found = subprocess.run([llamafactory_python(), "-c", "import llamafactory"], capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": os.environ.get("BENCH_LF_SITE",
                                                                                          "")})
        if found.returncode:
            return (
                "skipped: LLaMA-Factory does not import "
                f"({(found.stderr.strip().splitlines() or ['?'])[-1]}): bench/peer_llamafactory.py makes its "
                "environment; for the device, bench/gpu/prepare_carry.sh with LLAMAFACTORY=1")
    if side.endswith("+liger"):
        if not on_gpu:
            return "skipped: Liger Kernel runs on CUDA only"
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            return "skipped: liger-kernel is not installed"
    return None


def report(rows: list[dict], methods, args, config: dict, params: int, on_gpu: bool) -> str:
    """Median (range) over the repetitions that have figures; ratios to plain are per repetition."""
    def ok(method, side):
        return {r["rep"]: r for r in rows if r["method"] == method and r["side"] == side
                and "tokens_per_s" in r}

    out = []
    for method in methods:
        plain = ok(method, "plain")
        fpt = flops_per_token(method, config, params, args.seq_len)
        for side in [side for side in SIDES if any(r["side"] == side for r in rows)]:
            runs = ok(method, side)
            failed = [r.get("error", "") for r in rows if r["method"] == method and r["side"] == side
                      and "tokens_per_s" not in r]
            tps = [r["tokens_per_s"] for r in runs.values()]
            mem = [r.get("peak_allocated_mib") for r in runs.values()]
            reps = [k for k in runs if k in plain]
            out.append([method, side, len(runs), common.summary(tps),
                        common.summary(100 * fpt * t / (args.peak_tflops * 1e12)
                                       for t in tps) + " %" if on_gpu and tps else "-", common.summary(mem),
                        common.summary(r.get("nvidia_smi_peak_mib") for r in runs.values()),
                        common.summary(runs[k]["tokens_per_s"] / plain[k]["tokens_per_s"] for k in reps),
                        common.summary(runs[k]["peak_allocated_mib"] / plain[k]["peak_allocated_mib"]
                                       for k in reps if runs[k].get("peak_allocated_mib")
                                       and plain[k].get("peak_allocated_mib")),
                        "; ".join(f[:120] for f in failed) or ""])
    return common.table(["method", "side", "reps", "tokens/s", "MFU", "peak allocated MiB", "nvidia-smi MiB",
                         "tokens/s / plain", "peak memory / plain", "failed or skipped"], out)


def count_params(folder: Path) -> int:
    """Parameters of a saved model, from its safetensors headers (nothing loaded)."""
    import math
    import struct

    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        total += sum(math.prod(meta["shape"]) for key, meta in header.items() if key != "__metadata__")
    return total


def flops_per_token(method: str, config: dict, params: int, seq_len: int) -> float:
    """4N + 12LdS for LoRA/QLoRA (a frozen weight gets no weight-gradient matmul), N = matmul parameters."""
    layers, width = config["num_hidden_layers"], config["hidden_size"]
    matmul_params = params - (0 if config.get("tie_word_embeddings") else config["vocab_size"] * width)
    return 4 * matmul_params + 12 * layers * width * seq_len


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke test: the built-in tiny model, short sequences.")
    p.add_argument("--config", type=Path, default=None,
                   help="A model's config.json (tests/fixtures/llama-3.1-8b-instruct/config.json: the 8B "
                        "shape) built with random weights instead of the ~1B Llama.")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=None,
                   help="Untimed steps first. Default: 10 (GPU), 2 (--tiny).")
    p.add_argument("--timed", type=int, default=None, help="Timed steps. Default: 60 (GPU), 6 (--tiny).")
    p.add_argument("--profile-step", type=int, default=None,
                   help="The warm-up step profiled in the first LoRA repetition (-1: none). Default: 5 "
                        "(GPU), 1.")
    p.add_argument("--seq-len", type=int, default=None, help="Default: 2048 (GPU), 128 (--tiny).")
    p.add_argument("--batch-size", type=int, default=None, help="Default: 4 (GPU), 2 (--tiny).")
    p.add_argument("--deadline-s", type=float, default=480.0,
                   help="Seconds from this script's start after which no side starts and a running one is "
                        "killed.")
    p.add_argument("--peak-tflops", type=float, default=989.5,
                   help="Dense bf16 peak of the GPU (H100/H200 SXM).")
    p.add_argument("--out", default=os.environ.get("OUT"),
                   help="Results folder. Default: $OUT, else the workdir.")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 10)
    args.timed = args.timed if args.timed is not None else (6 if args.tiny else 60)
    args.profile_step = args.profile_step if args.profile_step is not None else (1 if args.tiny else 5)
    args.total_steps = args.warmup + args.timed + 1  # the step after the window closes it
    args.seq_len = args.seq_len or (128 if args.tiny else 2048)
    args.batch_size = args.batch_size or (2 if args.tiny else 4)

    import torch

    from mlflow_finetune_plugin.models.tiny import tiny_model_path

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.tiny:
        sys.exit("No CUDA GPU here: run with --tiny for the CPU smoke test.")
    args.precision = "bf16" if on_gpu else "fp32"
    work, env = common.setup(args.workdir)
    args.out = Path(args.out or work / "out").resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    common.log(f"building the model ({time.monotonic() - START:.0f} s in)")
    if args.config:
        model = build_model(work / "models", args.config)
    else:
        model = Path(tiny_model_path()) if args.tiny else build_model(work / "models")
    config = json.loads((model / "config.json").read_text())
    params = count_params(model)
    model_label = args.config.parent.name if args.config else "tiny" if args.tiny else "~1B Llama"
    rows = common.chat_rows(args.batch_size * args.total_steps + 8, seed=7, mean_words=args.seq_len * 2,
                            sigma=0.01, max_words=args.seq_len * 3)
    data = common.write_jsonl(work / "data" / f"long-{args.seq_len}.jsonl", rows)
    methods = [m for m in args.methods.split(",") if m]
    sides = [s for s in args.sides.split(",") if s]
    where = torch.cuda.get_device_name(0) if on_gpu else "CPU smoke test, not a performance result"
    title = (
        f"GPU training ({where}): {model_label} ({params / 1e6:.1f}M parameters), "
        f"sequence length {args.seq_len}, batch {args.batch_size}, {args.timed} timed steps after "
        f"{args.warmup} warm-up steps, {args.precision}, LoRA r=16 all-linear (QLoRA: NF4, double "
        "quantization)")
    common.log(f"model ready ({time.monotonic() - START:.0f} s in); {title}")

    done: list[dict] = []
    took: dict[str, float] = {}  # the last wall time of each (method, side): what the next one will need
    for rep in range(args.reps):
        for method in methods:
            for side in common.rotated(sides, rep):
                left = args.deadline_s - (time.monotonic() - START)
                need = took.get(f"{method}/{side}", 30.0)
                row = {"method": method, "side": side, "rep": rep}
                if (reason := skip_reason(side, method, on_gpu)) is not None:
                    row["error"] = reason
                elif left < need:
                    row["error"] = (f"skipped: {left:.0f} s left before the deadline, the side needs about "
                                    f"{need:.0f}")
                else:
                    common.log(f"rep {rep + 1}/{args.reps} {method} {side} ({left:.0f} s left)")
                    row = run_side(side, method, rep, args, model, data, env, work, timeout=left)
                    took[f"{method}/{side}"] = row["wall_s"]
                    common.log(f"  {row.get('tokens_per_s', 0):,.0f} tokens/s, peak "
                               f"{row.get('peak_allocated_mib') or 0:,.0f} MiB allocated, {row['wall_s']} s "
                               "wall"
                               + (f"; {row['error']}" if "error" in row else ""))
                done.append(row)
                with open(results, "a") as f:
                    f.write(json.dumps({**row, "device": where, "title": title}) + "\n")
                print(report(done, methods, args, config, params, on_gpu), flush=True)

    common.header(title)
    print(report(done, methods, args, config, params, on_gpu))
    spread = [r["tokens_per_s"] for r in done if r["side"] == "plain" and "tokens_per_s" in r]
    if len(spread) > 1:
        print(f"\nplain tokens/s over all methods and reps: {statistics.median(spread):,.0f} median")
    print(f"\nresults: {results}; profiles: {sorted(p.name for p in args.out.glob('profile-*.txt'))}; "
          f"{time.monotonic() - START:.0f} s in all")


if __name__ == "__main__":
    main()
