"""GPU training: LoRA, QLoRA and full fine-tuning of a ~1B Llama at 2k tokens, plugin vs plain transformers + PEFT.

The model is built from a config with random weights (hidden 2048, 16 layers, 32 heads, intermediate 5632,
vocabulary 32000: ~1.0B parameters, bf16) and the built-in tiny model's tokenizer and chat template: nothing is
downloaded. Every row is longer than the sequence length and truncated to it, so every batch is exactly
batch x seq_len tokens on both sides (packing off). Per method and repetition, in alternating order:
  plugin  mlflow run PROJECT -e METHOD --backend finetune -P model=DIR (tokens and seconds from the run's metrics)
  plain   bench/plain_train.py --method METHOD --precision bf16 (transformers Trainer + PEFT / bitsandbytes)
Reported: tokens/s (non-padding tokens / Trainer `train_runtime`), MFU, peak GPU memory (the most `nvidia-smi`
reported in use while the side ran, CUDA context included, the same on both sides) and plugin/plain ratios.
MFU = flops per token x tokens/s / the GPU's dense bf16 peak (`--peak-tflops`); flops per token = 6N + 12LdS for
full fine-tuning, 4N + 12LdS for LoRA/QLoRA (a frozen weight gets no weight-gradient matmul), N = parameters in
matmuls (input embedding excluded), L layers, d width, S seq_len.

    python bench/gpu/train_throughput.py                    # on a GPU (~15-20 min, 3 reps; estimate, never run)
    python bench/gpu/train_throughput.py --tiny --reps 1    # CPU smoke test: tiny model, seq 128, 10 steps, ~3 min
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

METHODS = ("lora", "qlora", "full")
LR = {"lora": 2e-4, "qlora": 2e-4, "full": 1e-5}
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 32, "head_dim": 64, "vocab_size": 32000, "max_position_embeddings": 4096,
            "tie_word_embeddings": False, "initializer_range": 0.02}


def build_1b(root: Path) -> Path:
    """The ~1B Llama (seeded random bf16 weights, built on the GPU once) with the tiny model's tokenizer files."""
    out = root / "llama-1b-bf16"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mlflow_finetune_plugin.models.tiny import tiny_model_path

    tiny = Path(tiny_model_path())
    config = json.loads((tiny / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{**config, **LLAMA_1B, "dtype": "bfloat16"})).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens", "generation_config")):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


def project(work: Path, method: str, args, data: Path) -> Path:
    """The plugin side's project folder: a finetune.yaml with the same settings as the plain side's arguments."""
    import yaml

    recipe = {"method": method, "data": {"train": str(data), "format": "chat", "max_length": args.seq_len,
                                         "packing": False},
              "train": {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": LR[method],
                        "lr_scheduler": "cosine", "warmup_ratio": 0.05, "logging_steps": 5,
                        "save_steps": args.steps + 1000, "seed": 42,
                        "gradient_checkpointing": args.gradient_checkpointing},
              "eval": {"enabled": False}, "registry": {"enabled": False}}
    if method != "full":
        recipe[method] = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    folder = work / "projects" / f"gpu-{method}"
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
        while not self._stop.wait(0.2):
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i",
                                  "0"], capture_output=True, text=True).stdout.strip()
            if out.isdigit():
                self.peak = max(self.peak or 0, int(out))

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def run_side(side: str, method: str, args, model: Path, data: Path, env: dict, work: Path, tag: str) -> dict:
    with GpuMemory() as mem:
        if side == "plugin":
            run = common.mlflow_run({"model": model}, env, work, tag, project=project(work, method, args, data),
                                    entry=method)
            r = common.training_figures(run["run_id"])
            # The logged model (2 GB for a full fine-tune) is not needed: keep the disk free for the next runs.
            shutil.rmtree(urlparse(common.client().get_run(run["run_id"]).info.artifact_uri).path,
                          ignore_errors=True)
        else:
            r = common.plain_train({"model": model, "data": data, "method": method, "precision": args.precision,
                                    "max_length": args.seq_len, "batch_size": args.batch_size, "steps": args.steps,
                                    "lr": LR[method], "gradient_checkpointing": args.gradient_checkpointing},
                                   env, work, tag)
    return {**r, "peak_mib": mem.peak}


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
    layers, width = config["num_hidden_layers"], config["hidden_size"]
    matmul_params = params - (0 if config.get("tie_word_embeddings") else config["vocab_size"] * width)
    return (6 if method == "full" else 4) * matmul_params + 12 * layers * width * seq_len


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: the built-in tiny model, short sequences.")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="Default: 40 (GPU), 10 (--tiny).")
    p.add_argument("--seq-len", type=int, default=None, help="Default: 2048 (GPU), 128 (--tiny).")
    p.add_argument("--batch-size", type=int, default=None, help="Default: 4 (GPU), 2 (--tiny).")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.5, help="Dense bf16 peak of the GPU (H100/H200 SXM).")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    args.steps = args.steps or (10 if args.tiny else 40)
    args.seq_len = args.seq_len or (128 if args.tiny else 2048)
    args.batch_size = args.batch_size or (2 if args.tiny else 4)

    import torch

    from mlflow_finetune_plugin.models.tiny import tiny_model_path

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.tiny:
        sys.exit("No CUDA GPU here: run with --tiny for the CPU smoke test.")
    args.precision = "bf16" if on_gpu else "fp32"
    work, env = common.setup(args.workdir)
    model = Path(tiny_model_path()) if args.tiny else build_1b(work / "models")
    config = json.loads((model / "config.json").read_text())
    params = count_params(model)
    rows = common.chat_rows(args.batch_size * args.steps + 8, seed=7, mean_words=args.seq_len * 2, sigma=0.01,
                            max_words=args.seq_len * 3)
    data = common.write_jsonl(work / "data" / f"long-{args.seq_len}.jsonl", rows)
    methods = [m for m in args.methods.split(",") if m]

    results = {(m, side): [] for m in methods for side in ("plugin", "plain")}
    for method in methods:
        for rep in range(args.reps):
            for side in common.rotated(["plugin", "plain"], rep):
                common.log(f"{method} rep {rep + 1}/{args.reps}: {side}")
                r = run_side(side, method, args, model, data, env, work, f"gpu-{method}-{side}-{rep}")
                common.log(f"  {r['tokens']:.0f} tokens in {r['seconds']:.1f} s = {r['tokens_per_s']:.0f} tokens/s, "
                           f"peak {r['peak_mib'] or '-'} MiB")
                results[(method, side)].append(r)

    where = f"{torch.cuda.get_device_name(0)}" if on_gpu else "CPU smoke test, not a performance result"
    common.header(f"GPU training ({where}): {'tiny' if args.tiny else '~1B Llama'} ({params / 1e6:.1f}M parameters), "
                  f"sequence length {args.seq_len}, batch {args.batch_size}, {args.steps} steps, {args.precision}, "
                  f"LoRA/QLoRA r=16 all-linear (QLoRA: NF4, double quantization), {args.reps} reps: median (range)")
    table = []
    for method in methods:
        plugin, plain = results[(method, "plugin")], results[(method, "plain")]
        for side, runs in (("plain", plain), ("plugin", plugin)):
            tps = [r["tokens_per_s"] for r in runs]
            fpt = flops_per_token(method, config, params, args.seq_len)
            mfu = common.summary(100 * fpt * t / (args.peak_tflops * 1e12) for t in tps) + " %" if on_gpu else "-"
            table.append([method, side, common.summary(tps), mfu,
                          common.summary(r["peak_mib"] for r in runs),
                          "1" if side == "plain" else common.summary(common.ratios(
                              tps, [r["tokens_per_s"] for r in plain])),
                          "1" if side == "plain" else common.summary(common.ratios(
                              [r["peak_mib"] for r in runs], [r["peak_mib"] for r in plain]))])
    print(common.table(["method", "side", "tokens/s", "MFU", "peak GPU MiB", "plugin / plain tokens/s",
                        "plugin / plain peak memory"], table))


if __name__ == "__main__":
    main()
