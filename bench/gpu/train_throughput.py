"""GPU training throughput: LoRA vs QLoRA vs full on a ~1B Llama at 2k tokens, plugin vs plain transformers + PEFT.

For an H200-class GPU. The model is built from a config with random weights (hidden 2048, 16 layers, 32 heads,
intermediate 5632, vocabulary 32000: ~1.0B parameters, bf16) and the built-in tiny model's tokenizer and chat
template: nothing is downloaded. Every row is longer than the sequence length and truncated to it, so every batch
is exactly batch x seq_len tokens with no padding on either side (packing off).

Per method and repetition (rotated order):
  plugin  mlflow run PROJECT -e METHOD --backend finetune -P model=DIR (peak memory noted at the training
          process's exit by the bench-only bench/_probe/sitecustomize.py)
  plain   bench/plain_train.py --method METHOD --precision bf16 (transformers Trainer + PEFT / bitsandbytes)
Reported: tokens/s in steady state (median over logging windows of tokens added / seconds) and over the whole
loop (tokens / Trainer `train_runtime`; the plugin uses TRL's fused LM head on CUDA, `train.fused_lm_head: auto`), MFU
from the steady state, peak `torch.cuda.max_memory_allocated`, and plugin/plain ratios. MFU = flops per token x tokens/s / peak bf16 dense flops (H200 SXM: 989.5 TFLOPS), with
flops per token = 6N + 12*L*d*S for full fine-tuning and 4N + 12*L*d*S for LoRA/QLoRA (a frozen weight gets no
weight-gradient matmul), N = parameters doing matmuls (input embedding excluded), L layers, d width, S seq_len.

    python bench/gpu/train_throughput.py                         # on the GPU machine (~15-20 min, 3 reps)
    python bench/gpu/train_throughput.py --tiny                  # CPU smoke test: tiny model, seq 128, 10 steps
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import common  # noqa: E402
from bench.models import model_dir, n_params  # noqa: E402

METHODS = ("lora", "qlora", "full")
LR = {"lora": 2e-4, "qlora": 2e-4, "full": 1e-5}


def recipe(method: str, seq_len: int, batch: int, steps: int, grad_ckpt: bool, logging_steps: int) -> dict:
    r = {
        "method": method,
        "data": {"format": "chat", "max_length": seq_len, "packing": False},
        "train": {"max_steps": steps, "batch_size": batch, "learning_rate": LR[method], "lr_scheduler": "cosine",
                  "warmup_ratio": 0.05, "logging_steps": logging_steps, "save_steps": steps + 1000, "seed": 42,
                  "gradient_checkpointing": grad_ckpt},
        "eval": {"enabled": False},
        "registry": {"enabled": False},
    }
    if method in ("lora", "qlora"):
        r[method] = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    return r


def long_rows(n: int, seq_len: int) -> list[dict]:
    """Chat rows of more than seq_len tokens (truncated to exactly seq_len by both sides)."""
    return common.chat_rows(n, seed=7, mean_words=seq_len * 2, sigma=0.01, max_words=seq_len * 3)


def plugin_side(method, project, model, env, work, tag) -> dict:
    peak_file = work / "logs" / f"{tag}.cuda-peak.jsonl"
    peak_file.unlink(missing_ok=True)
    env = common.with_probes(env, BENCH_CUDA_PEAK_FILE=peak_file)
    res = common.run_plugin(project, method, {"model": model}, env, work, work / "logs" / f"{tag}.log")
    client = common.mlflow_client(env)
    out = common.train_loop_figures(client, res["run_id"])
    peaks = [json.loads(line)["peak"] for line in peak_file.read_text().splitlines()] if peak_file.exists() else []
    out["peak_memory"] = max(peaks) if peaks else None
    # The logged model (2 GB for a full fine-tune) is not needed: keep the disk free for the next runs.
    shutil.rmtree(urlparse(client.get_run(res["run_id"]).info.artifact_uri).path, ignore_errors=True)
    return out


def plain_side(method, model, data, args, env, work, tag, precision) -> dict:
    cmd = [str(Path(__file__).resolve().parents[1] / "plain_train.py"), "--model", str(model), "--data", str(data),
           "--method", method, "--precision", precision, "--max-length", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--lr", str(LR[method]),
           "--lora-dropout", "0.0", "--logging-steps", str(args.logging_steps), "--output-dir", str(work / "plain-out")]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    r = common.run_python(cmd, env, work, work / "logs" / f"{tag}.log")
    r["window_tokens_per_s"] = common.window_rate(r["log_points"])
    return r


def flops_per_token(method: str, config: dict, params: int, seq_len: int) -> float:
    L, d = config["num_hidden_layers"], config["hidden_size"]
    embed = 0 if config.get("tie_word_embeddings") else config["vocab_size"] * d
    n = params - embed
    return (6 if method == "full" else 4) * n + 12 * L * d * seq_len


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: the built-in tiny model, short sequences.")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="Default: 40 (GPU), 10 (--tiny).")
    p.add_argument("--seq-len", type=int, default=None, help="Default: 2048 (GPU), 128 (--tiny).")
    p.add_argument("--batch-size", type=int, default=None, help="Default: 4 (GPU), 2 (--tiny).")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.5, help="bf16 dense peak of the GPU (H200/H100 SXM).")
    common.output_args(p, render=False)
    args = p.parse_args(argv)
    args.steps = args.steps or (10 if args.tiny else 40)
    args.seq_len = args.seq_len or (128 if args.tiny else 2048)
    args.batch_size = args.batch_size or (2 if args.tiny else 4)
    args.logging_steps = 2 if args.tiny else 5

    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.tiny:
        sys.exit("No CUDA GPU here: run with --tiny for the CPU smoke test.")
    gpu = torch.cuda.get_device_name(0) if on_gpu else None
    work = common.workdir(args.workdir)
    (work / "logs").mkdir(exist_ok=True)
    env = common.bench_env(work)
    tiny = common.tiny_model_dir(env)
    size = "tiny" if args.tiny else "1b"
    common.log(f"building/loading the {size} model")
    model = model_dir(size, tiny, work / "models", dtype="bfloat16" if on_gpu else "float32",
                      device="cuda" if on_gpu else "cpu")
    config = json.loads((Path(model) / "config.json").read_text())
    params = n_params(model)
    data = common.write_jsonl(work / "data" / f"long-{args.seq_len}.jsonl",
                              long_rows(args.batch_size * args.steps + 8, args.seq_len))
    precision = "bf16" if on_gpu else "fp32"
    info = common.machine()
    methods = [m for m in args.methods.split(",") if m]

    results: dict[tuple, list[dict]] = {}
    for method in methods:
        project = common.write_project(work / "projects" / f"gpu-{method}",
                                       recipe(method, args.seq_len, args.batch_size, args.steps,
                                              args.gradient_checkpointing, args.logging_steps), data)
        for rep in range(args.reps):
            for side in (("plugin", "plain") if rep % 2 == 0 else ("plain", "plugin")):
                common.log(f"{method} rep {rep + 1}/{args.reps}: {side}")
                tag = f"gpu-{method}-{side}-{rep}"
                r = (plugin_side(method, project, model, env, work, tag) if side == "plugin"
                     else plain_side(method, model, data, args, env, work, tag, precision))
                common.log(f"  {r['tokens']:.0f} tokens in {r['seconds']:.1f}s = {r['tokens_per_s']:.0f} tok/s, "
                           f"peak {(r.get('peak_memory') or 0) / 2**30:.1f} GiB")
                results.setdefault((method, side), []).append(r)

    fpt = {m: flops_per_token(m, config, params, args.seq_len) for m in methods}
    rows = []
    for method in methods:
        for side in ("plain", "plugin"):
            runs = results[(method, side)]
            steady = common.median(r.get("window_tokens_per_s") for r in runs)
            loop = common.median(r["tokens_per_s"] for r in runs)
            peak = common.median(r.get("peak_memory") for r in runs)
            ratios = {key: [a.get(key) / b.get(key) if a.get(key) and b.get(key) else None for a, b in
                            zip(results[(method, "plugin")], results[(method, "plain")])]
                      for key in ("window_tokens_per_s", "tokens_per_s", "peak_memory")}
            mfu = fpt[method] * steady / (args.peak_tflops * 1e12) if on_gpu and steady == steady else None
            rows.append([method, side, steady, loop, f"{100 * mfu:.1f}%" if mfu is not None else "-",
                         f"{peak / 2**30:.1f}" if peak == peak else "-"]
                        + (["1 (baseline)"] * 3 if side == "plain" else
                           [common.median(ratios[k]) for k in ("window_tokens_per_s", "tokens_per_s", "peak_memory")]))
    tbl = common.table(["method", "side", "tokens/s, steady state", "tokens/s, whole loop", "MFU (steady state)",
                        "peak GiB (max_memory_allocated)", "plugin/plain tokens/s, steady", "plugin/plain, whole loop",
                        "plugin/plain peak memory"], rows)
    print(tbl)
    if args.no_doc:
        return
    cmd = "python bench/gpu/train_throughput.py" + (" --tiny" if args.tiny else "") + \
        f" --reps {args.reps} --steps {args.steps} --seq-len {args.seq_len} --batch-size {args.batch_size}"
    shape = (f"{size} model ({params / 1e6:.1f}M parameters, hidden {config['hidden_size']}, "
             f"{config['num_hidden_layers']} layers, vocabulary {config['vocab_size']}), sequence length "
             f"{args.seq_len}, batch {args.batch_size}, {args.steps} steps, {precision}, LoRA/QLoRA r=16 on all "
             f"linear layers (QLoRA: NF4, double quantization, {'bf16' if on_gpu else 'fp32'} compute), packing off, "
             f"every row exactly "
             f"seq_len tokens")
    if on_gpu:
        body = f"""## 5. GPU: LoRA vs QLoRA vs full on a ~1B Llama at {args.seq_len} tokens

{common.machine_line(info, gpu=f"{gpu} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")}

`{cmd}`: {shape}. MFU against {args.peak_tflops:.1f} TFLOPS bf16 dense; flops per token 6N + 12LdS (full) or
4N + 12LdS (LoRA/QLoRA), N = {(params - (0 if config.get('tie_word_embeddings') else config['vocab_size'] * config['hidden_size'])) / 1e6:.0f}M
matmul parameters.

{tbl}

![gpu](benchmarks/gpu_train_throughput.png)
"""
        _plot(results, methods)
    else:
        body = f"""## 5. GPU: LoRA vs QLoRA vs full on a ~1B Llama at 2k tokens

**No GPU figures yet**: no GPU has been available to this project's benchmark runs. Run
`python bench/gpu/train_throughput.py` on an H200-class machine (defaults: the ~1B model, sequence length 2048,
batch 4, 40 steps, 3 reps) and it replaces this section with tokens/s, MFU and peak memory per method against
plain transformers + PEFT, with the date and the GPU.

Last CPU smoke run, which only proves that the script and both sides work end to end (the numbers are not a
performance result): {common.machine_line(info)}

`{cmd}`: {shape}.

{tbl}
"""
    common.write_section("gpu_train_throughput", body)
    print(f"\nwrote {common.DOC}")


def _plot(results, methods) -> Path:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for j, side in enumerate(("plain", "plugin")):
        xs = [i + (j - 0.5) * 0.4 for i in range(len(methods))]
        axes[0].bar(xs, [common.median(r.get("window_tokens_per_s") for r in results[(m, side)]) for m in methods],
                    0.4, label=side)
        axes[1].bar(xs, [common.median(r.get("peak_memory") for r in results[(m, side)]) / 2**30 for m in methods],
                    0.4, label=side)
    for ax, title in ((axes[0], "tokens/s, steady state (median)"), (axes[1], "peak GiB (max_memory_allocated)")):
        ax.set_xticks(range(len(methods)), methods)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    return common.save_plot(fig, "gpu_train_throughput.png")


if __name__ == "__main__":
    main()
