"""Packing layouts: when does packing pay with SDPA? Padded batches against packed rows against one flattened row.

One process, one LoRA model, the same examples in three layouts; each timed step is one forward + backward of a
batch of `--batch` rows, and the figure is non-padding (real) tokens per second of it:

  padded     examples in order, each batch padded to its longest example (TRL's collator without packing)
  rows       TRL's best-fit-decreasing packing into rows of up to max_length, kept as rows: what the plugin does with
             `data.packing: true` and sdpa/eager (`mlflow_finetune_plugin.sft.PackedRowsCollator`)
  flattened  the same packed rows flattened into one padding-free row: TRL's layout, meant for a varlen
             flash-attention kernel, here under SDPA

Grid: example lengths of similar size (log-normal, sigma 0.2) or mixed (sigma 0.8, a long tail), both with a
median of 100 tokens, against max_length 256, 512, 1024. Layouts interleave within each repetition (rotated
order); the median of per-repetition ratios against `padded` is reported. This is what `data.packing: auto` is
decided on (docs/methods.md#sequence-packing).

    python bench/packing_layouts.py                # tiny model, 3 reps, 1 thread: ~8 min on 2 cores
    python bench/packing_layouts.py --model small --reps 3
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.models import model_dir, n_params  # noqa: E402

LAYOUTS = ["padded", "rows", "flattened"]
SHAPES = {"similar": 0.2, "mixed": 0.8}
MEDIAN_TOKENS = 100


def examples(n: int, sigma: float, max_length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = max(8, min(max_length, int(rng.lognormvariate(math.log(MEDIAN_TOKENS), sigma))))
        out.append([rng.randrange(4, 2048) for _ in range(length)])
    return out


def batches(rows: list[list[int]], layout: str, batch: int, max_length: int, pad_id: int) -> list[dict]:
    """The batches one pass over `rows` makes in `layout`, built by TRL's packing and collators (and the plugin's)."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from mlflow_finetune_plugin.sft import PackedRowsCollator

    if layout == "padded":
        items = [{"input_ids": r} for r in rows]
        collate = DataCollatorForLanguageModeling(pad_token_id=pad_id)
    else:
        items = list(pack_dataset(Dataset.from_dict({"input_ids": rows}), max_length, strategy="bfd"))
        collate = (PackedRowsCollator(pad_token_id=pad_id) if layout == "rows"
                   else DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True))
    out = []
    for i in range(0, len(items) - batch + 1, batch):
        b = collate(items[i:i + batch])
        real = int(b["attention_mask"].sum()) if "attention_mask" in b else int(b["input_ids"].numel())
        if layout == "rows":
            b.pop("attention_mask")  # what FinetuneSFTTrainer does: the per-row mask comes from position_ids
        elif layout == "flattened":
            b = {k: b[k] for k in ("input_ids", "labels", "position_ids")}
        out.append((b, real))
    return out


def step_rate(model, batch_list, steps: int) -> float:
    """Real tokens per second over `steps` forward + backward passes (after one untimed warm-up pass)."""
    b, _ = batch_list[0]
    model(**b, use_cache=False).loss.backward()
    tokens, t0 = 0, time.perf_counter()
    for b, real in batch_list[1:steps + 1]:
        model(**b, use_cache=False).loss.backward()
        tokens += real
    return tokens / (time.perf_counter() - t0)


def measure(args, work: Path) -> dict:
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    env = common.bench_env(work)
    path = model_dir(args.model, common.tiny_model_dir(env), work / "models")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                             task_type="CAUSAL_LM")).train()
    pad_id = model.config.pad_token_id or 0
    results = {}
    cases = [(shape, ml) for shape in SHAPES for ml in args.max_lengths]
    for rep in range(args.reps):
        for shape, ml in cases:
            rows = examples(args.rows, SHAPES[shape], ml, seed=rep)
            made = {layout: batches(rows, layout, args.batch, ml, pad_id) for layout in LAYOUTS}
            k = rep % len(LAYOUTS)
            for layout in LAYOUTS[k:] + LAYOUTS[:k]:
                steps = min(args.steps, len(made[layout]) - 1)
                rate = step_rate(model, made[layout], steps)
                fill = sum(r for _, r in made[layout]) / sum(b["input_ids"].numel() for b, _ in made[layout])
                results.setdefault(f"{shape}|{ml}|{layout}", []).append({"rate": rate, "fill": fill})
                model.zero_grad(set_to_none=True)
            common.log(f"rep {rep + 1}/{args.reps} {shape} max_length {ml}: " + ", ".join(
                f"{lay} {results[f'{shape}|{ml}|{lay}'][-1]['rate']:.0f}" for lay in LAYOUTS) + " tok/s")
    return {"results": results, "args": vars(args), "info": common.machine(), "params": n_params(path),
            "load": common.loadavg()}


def render(raw: dict, no_doc: bool) -> None:
    args = argparse.Namespace(**raw["args"])
    res = raw["results"]
    rows, ratios = [], {}
    for shape in SHAPES:
        for ml in args.max_lengths:
            base = res[f"{shape}|{ml}|padded"]
            row = [shape, str(ml)]
            for layout in LAYOUTS:
                runs = res[f"{shape}|{ml}|{layout}"]
                per_rep = [r["rate"] / b["rate"] for r, b in zip(runs, base)]
                ratios[(shape, ml, layout)] = per_rep
                row.append(f"{common.median(r['fill'] for r in runs):.0%}")
                row.append("1 (baseline)" if layout == "padded" else
                           f"{common.fmt(common.median(per_rep))} ({common.spread(per_rep)})")
            rows.append(row)
    headers = ["lengths", "max_length"]
    for layout in LAYOUTS:
        headers += [f"{layout}: real tokens in batch", f"{layout}: tokens/s vs padded (range)"]
    tbl = common.table(headers, rows)
    print(tbl)
    if no_doc:
        return
    plot = _plot(ratios, args)
    common.write_section("packing_layouts", _doc(raw, args, tbl, ratios))
    print(f"\nwrote {common.DOC} and {plot}")


def _doc(raw, args, tbl, ratios) -> str:
    def r(shape, ml, layout):
        return common.fmt(common.median(ratios[(shape, ml, layout)]))

    def series(shape, layout):
        return " / ".join(f"{r(shape, ml, layout)}x" for ml in args.max_lengths)

    lengths = " / ".join(str(ml) for ml in args.max_lengths)
    return f"""## 1b. Packing layouts under SDPA: padded vs packed rows vs one flattened row

{common.machine_line(raw["info"])}
Shared 2-core machine (load average at the end: {raw["load"]}); ratios within one repetition are what counts.

    python bench/packing_layouts.py --reps {args.reps} --model {args.model} --threads {args.threads}

Model `{args.model}` ({raw["params"] / 1e6:.2f}M parameters, fp32, CPU, {args.threads} torch thread(s)), LoRA r=16 on
all linear layers, in one process. {args.rows} generated examples per case (median {MEDIAN_TOKENS} tokens;
*similar*: log-normal sigma {SHAPES["similar"]}, *mixed*: sigma {SHAPES["mixed"]}, capped at max_length), batches
of {args.batch} rows, {args.steps} timed forward + backward passes per layout after one warm-up pass. Figure: real
(non-padding) tokens per second. **padded**: each batch padded to its longest example. **rows**: TRL's
best-fit-decreasing packing into rows of up to max_length, kept as rows with `position_ids` and no 2D mask (the
plugin's layout for `data.packing: true` with sdpa/eager). **flattened**: the same packed rows as one padding-free
row (TRL's layout, made for varlen flash-attention). "Real tokens in batch": the share of the batch's positions that
are not padding.

{tbl}

![packing layouts](benchmarks/packing_layouts.png)

Reading: packed rows fill the batch with real tokens, but every row costs attention over its whole length. With
mixed lengths the padding saved outweighs that: {series("mixed", "rows")} padded at max_length {lengths}. With
examples of similar length there is little padding to save, and packing pays only while max_length stays close to
the examples' length: {series("similar", "rows")}. The flattened layout is slower than padding everywhere under
SDPA ({series("mixed", "flattened")} on mixed lengths), which is why the plugin keeps rows unless a
flash-attention kernel is configured. Whether packing pays therefore depends on the data's length spread and on
max_length together, which `data.packing: auto` cannot see before tokenizing: it packs only with flash attention,
and `data.packing: true` is the switch for mixed-length data.
"""


def _plot(ratios, args) -> Path:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    keys = [(s, m) for s in SHAPES for m in args.max_lengths]
    width = 0.38
    for j, (layout, color) in enumerate((("rows", "#2ca02c"), ("flattened", "#d62728"))):
        xs = [i + (j - 0.5) * width for i in range(len(keys))]
        vals = [ratios[(s, m, layout)] for s, m in keys]
        ax.bar(xs, [common.median(v) for v in vals], width, color=color, label=layout)
        for x, v in zip(xs, vals):
            ax.scatter([x] * len(v), v, color="black", s=6, zorder=3)
    ax.axhline(1.0, color="gray", lw=1, ls="--", label="padded")
    ax.set_xticks(range(len(keys)), [f"{s}\nmax_length {m}" for s, m in keys], fontsize=8)
    ax.set_ylabel("real tokens/s vs padded (median of reps)")
    ax.set_title("Packing layouts under SDPA (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return common.save_plot(fig, "packing_layouts.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--model", default="tiny", choices=["tiny", "small"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=400, help="Examples per case and repetition.")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="Timed passes per layout and case.")
    p.add_argument("--max-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[256, 512, 1024])
    common.output_args(p)
    common.measure_or_render("packing_layouts", p.parse_args(argv), measure, render)


if __name__ == "__main__":
    main()
