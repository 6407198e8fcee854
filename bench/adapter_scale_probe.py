"""How much of a LoRA adapter's gain survives when its update is scaled down, and what that buys in
forgetting.

A ceiling probe, not a training recipe: one registered LoRA version, its update scaled by s (the adapter's
`scaling`, i.e. W + s * alpha/r * B A; trained token rows are kept whole, they end the turn), evaluated at
each s on the held-out prompts the run was evaluated on (greedy, tuned only) and on the forgetting set. s = 0
is the base model with the token rows, s = 1 the version as trained. Weight interpolation towards the base
(WiSE-FT) is the cheapest known way to trade a fine-tune's gain for less forgetting, so the best rougeL at
`ppl_ratio <= 1.2` along it is the most this trained adapter offers at that forgetting budget.

    MLFLOW_TRACKING_URI=sqlite:////tmp/g3cpu/mlflow.db \\
        python bench/adapter_scale_probe.py models:/gemma3-support-bot/1 --scales 0.25,0.5,0.75,1 --against
        examples.json

`--against` takes a per-example table the run logged (eval/examples.json, with `retrieval_rougeL` etc.): each
scale's rougeL is then compared, paired, with that contender's (the bootstrap interval of the mean difference,
as the verdict computes it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import common  # noqa: E402


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_uri")
    parser.add_argument("--scales", default="0.25,0.5,0.75,1")
    parser.add_argument("--against", help="eval/examples.json of a run: compare with its contenders, paired")
    parser.add_argument("--contender", default="retrieval")
    parser.add_argument("--max-examples", type=int, default=None)
    args = parser.parse_args()

    import mlflow
    import torch

    from mlflow_finetune_plugin.config.schema import Recipe
    from mlflow_finetune_plugin.evaluate import forgetting
    from mlflow_finetune_plugin.evaluate.answering import answer_all
    from mlflow_finetune_plugin.evaluate.contenders import _eval_conversations
    from mlflow_finetune_plugin.evaluate.scoring import contender_metrics
    from mlflow_finetune_plugin.evaluate.verdict import paired_bootstrap
    from mlflow_finetune_plugin.logged_model import load_logged_model
    from mlflow_finetune_plugin.messages import split_conversation
    from mlflow_finetune_plugin.registry.versions import resolve_model_uri, source_recipe

    common.header(f"Adapter scale probe: {args.model_uri}")
    _, _, source_run = resolve_model_uri(args.model_uri)
    raw = source_recipe(source_run)
    recipe = Recipe.model_validate(raw)
    cfg = recipe.eval
    convs, _ = _eval_conversations(None, raw, source_run)
    examples = [pair for conv in convs if (pair := split_conversation(conv)) and pair[0]]
    examples = examples[: args.max_examples or cfg.max_examples]
    prompts, references = [p for p, _ in examples], [r for _, r in examples]
    texts = forgetting.read_set(recipe)

    other = None
    if args.against:
        table = json.loads(Path(args.against).read_text())
        column = table["columns"].index(f"{args.contender}_rougeL")
        other = [row[column] for row in table["data"]][: len(examples)]

    loaded = load_logged_model(mlflow.artifacts.download_artifacts(args.model_uri))
    model, tok = loaded.model, loaded.tokenizer
    layers = _lora_layers(model)
    if not layers:
        raise SystemExit(f"{args.model_uri} has no LoRA layers to scale")
    trained = [dict(layer.scaling) for layer in layers]
    print(
        f"{len(layers)} LoRA layers; {len(examples)} held-out prompts, max_new_tokens {cfg.max_new_tokens}; "
        f"{len(texts)} forgetting texts")

    rows = []
    with torch.no_grad():
        for scale in (float(s) for s in args.scales.split(",")):
            for layer, original in zip(layers, trained):
                for name, value in original.items():
                    layer.scaling[name] = value * scale
            started = time.perf_counter()
            answers, nll, n_tokens, _ = answer_all(model, tok, prompts, references, cfg, f"s={scale:g}")
            totals, per_example = contender_metrics(answers, references, nll, n_tokens, cfg)
            forgot = forgetting.measure(recipe, texts, model, tok)
            row = {"scale": scale, "rougeL": totals["rougeL"], "exact_match": totals.get("exact_match"),
                   "ppl_ratio": forgot["ppl_ratio"], "seconds": time.perf_counter() - started}
            if other is not None:
                low, high = paired_bootstrap(per_example["rougeL"], other)
                row.update(margin=totals["rougeL"] - sum(other) / len(other), low=low, high=high)
            rows.append(row)
            print(json.dumps(row), flush=True)

    header = ["scale", "tuned rougeL", "exact_match", "ppl_ratio"]
    if other is not None:
        header += [f"vs {args.contender} ({sum(other) / len(other):.3f})", "95% interval"]
    header.append("seconds")
    table = []
    for r in rows:
        line = [f"{r['scale']:g}", f"{r['rougeL']:.3f}", f"{r['exact_match']:.3f}", f"{r['ppl_ratio']:.3f}"]
        if other is not None:
            line += [f"{r['margin']:+.3f}", f"{r['low']:+.3f} to {r['high']:+.3f}"]
        line.append(f"{r['seconds']:.0f}")
        table.append(line)
    print(common.table(header, table))


if __name__ == "__main__":
    main()
