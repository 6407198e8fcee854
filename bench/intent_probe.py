"""How well can the base model tell the Q&A sets' intents apart from phrasings it never saw, before any
training?

The bundled Q&A sets (support-bot, it-helpdesk, bike-shop) give one canonical answer per intent; a held-out
question is answered right when the model picks its intent's answer. This measures that choice on the frozen
base model, without generation, two ways, for each set:

  BM25 top-1   the intent of the train question most similar to the held-out one (the retrieval contender's
  first
               shot: `evaluate/retrieval.py`): words only
  probe        a linear classifier (multinomial logistic regression, L2, standardised features) trained on the
  mean
               hidden state of each train question at one layer of the base model, scored on the held-out
               questions; best layer and last layer

The tuned model's exact match (the share of held-out questions answered with exactly their intent's answer) is
the same choice made by generation after fine-tuning: docs/methods.md compares the two. Deterministic; no
training run.

    python bench/intent_probe.py                     # smollm2, the three sets, every 3rd layer: ~3 min on 2
    cores python bench/intent_probe.py --sets support-bot --layers 0,9 --model tiny    # smoke test, ~20 s
"""

from __future__ import annotations

import argparse
import json

import common

SETS = ("support-bot", "it-helpdesk", "bike-shop")


def question_answer_pairs(path) -> list[tuple[str, str]]:
    """(user question, assistant answer) for every assistant turn of a chat JSONL file."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            messages = json.loads(line)["messages"]
            pairs += [(messages[i - 1]["content"], m["content"]) for i, m in enumerate(messages)
                      if m["role"] == "assistant" and i and messages[i - 1]["role"] == "user"]
    return pairs


def mean_hidden_states(model, tokenizer, questions: list[str]):
    """(questions, layers + 1, hidden) mean over each question's tokens (no chat template: the question
    alone)."""
    import torch

    rows = []
    with torch.no_grad():
        for q in questions:
            ids = tokenizer(q, return_tensors="pt").input_ids
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
            rows.append(torch.stack([h[0].mean(0) for h in hidden]))
    return torch.stack(rows)


def probe_accuracy(train_x, train_y, test_x, test_y, c: float = 1.0) -> float:
    """Multinomial logistic regression (scikit-learn's objective: C x summed cross-entropy + 0.5 |W|^2;
    full-batch L-BFGS), on features standardised with the train statistics; accuracy on the test rows."""
    import torch

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x, xt = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = c * torch.nn.functional.cross_entropy(x @ weight + bias, train_y, reduction="sum") \
            + 0.5 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((xt @ weight + bias).argmax(1) == test_y).float().mean())


def bm25_top1(train_pairs, eval_pairs) -> float:
    """Share of held-out questions whose most similar train question (BM25, the retrieval contender's) has the
    same answer."""
    from mlflow_finetune_plugin.evaluate.retrieval import nearest_shots

    train = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in train_pairs]
    shots = nearest_shots(train, [[{"role": "user", "content": q}] for q, _ in eval_pairs], 1)
    return sum(bool(s) and s[0][1]["content"] == a for s, (_, a) in zip(shots, eval_pairs)) / len(eval_pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sets", default=",".join(SETS), help="bundled recipes, comma-separated")
    parser.add_argument("--layers", default=None, help="hidden-state layers to probe (0 = embeddings); "
                                                       "default every 3rd and the last")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from mlflow_finetune_plugin.models.base import load_tokenizer, resolve_model_path

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype=torch.float32).eval()
    n_layers = model.config.num_hidden_layers
    layers = ([int(x) for x in args.layers.split(",")] if args.layers
              else sorted(set(range(0, n_layers + 1, 3)) | {n_layers}))
    common.header(f"## Intent probe: can the frozen base model ({args.model}) tell the intents apart?")
    print(
        "| set | intents | train / held-out questions | BM25 top-1 | probe, best layer | probe, last layer |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.sets.split(","):
        folder = common.REPO / "recipes" / name / "data"
        train, held = question_answer_pairs(folder / "train.jsonl"), question_answer_pairs(folder
                                                                                           / "eval.jsonl")
        answers = sorted({a for _, a in train})
        y = torch.tensor([answers.index(a) for _, a in train])
        yt = torch.tensor([answers.index(a) for _, a in held])
        x = mean_hidden_states(model, tokenizer, [q for q, _ in train])
        xt = mean_hidden_states(model, tokenizer, [q for q, _ in held])
        scores = {layer: probe_accuracy(x[:, layer], y, xt[:, layer], yt) for layer in layers}
        best = max(scores, key=scores.get)
        print(f"| {name} | {len(answers)} | {len(train)} / {len(held)} | {bm25_top1(train, held):.3f} | "
              f"{scores[best]:.3f} (layer {best}) | {scores[layers[-1]]:.3f} (layer {layers[-1]}) |",
              flush=True)
    print("\nEvery layer probed: " + ", ".join(str(layer) for layer in layers))


if __name__ == "__main__":
    main()
