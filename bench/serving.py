"""How fast does the playground serve? Its transformers engine against plain `model.generate`, streaming.

A LoRA version of the model is trained for 2 steps and registered in the bench store (once). Then, in this
process:
  engine  `TransformersEngine` serving the version and its base (`NAME/V`, `NAME/V:base`: one base copy,
  adapter
          layers toggled per forward), answers read from `stream()` as the playground reads them
  plain   `model.generate` with a streamer on the same adapter (`PeftModel.from_pretrained` over the same
  base) and
          on the plain base
Greedy, the first support-bot eval prompt with the chat template, the same max_new_tokens; the four (side,
model) pairs run in rotated order each repetition, after one warm-up round that is dropped.
  TTFT      engine: from calling `stream()` to its first text piece; plain: from calling `generate()`
  (template
            applied inside both) to the first new token handed to the streamer
  tokens/s  new tokens / seconds from the call to the last token (prefill included)
Both sides generate in a worker thread, as a server answers a request. That matters on CPU: once a thread has
run torch's parallel (OpenMP) work, generation in another thread ran at ~0.6x (smollm2, 2 cores: 12.8-15.4
against 22-29 tokens/s in the main thread), so a plain side in the main thread does not compare like with
like. Goals (issue 18): tokens/s >= 0.95x plain, TTFT <= 1.2x plain, the same answers.

    python bench/serving.py                       # smollm2, 64 new tokens, 5 reps: ~4 min on 2 cores
    python bench/serving.py --max-new-tokens 8 --reps 1     # smoke test, ~1.5 min (the first time: +1 min)
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import common


def plain_generate(model, tokenizer, messages, max_new_tokens: int, eos) -> dict:
    import torch

    class FirstToken:  # what generate() calls on a streamer: put(prompt), put(token)..., end()
        puts, first = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                self.first = time.perf_counter()

        def end(self):
            pass

    streamer = FirstToken()
    start = time.perf_counter()
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    result = []

    def work():  # in a request thread, as the engine (and any server) generates: see the module docstring
        with torch.no_grad():
            result.append(model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                         temperature=None, top_p=None, eos_token_id=eos,
                                         pad_token_id=tokenizer.pad_token_id, streamer=streamer))

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    out = result[0]
    total = time.perf_counter() - start
    new = out[0, enc["input_ids"].shape[1]:]
    return {"ttft": streamer.first - start, "total": total, "tokens": int(new.shape[0]),
            "text": tokenizer.decode(new, skip_special_tokens=True).strip()}


def engine_generate(engine, choice, messages, max_new_tokens: int) -> dict:
    from mlflow_finetune_plugin.serving.base import Settings

    start, first, pieces = time.perf_counter(), None, []
    for piece in engine.stream(choice, messages, Settings(temperature=0.0, max_new_tokens=max_new_tokens)):
        if piece and first is None:
            first = time.perf_counter()
        pieces.append(piece)
    total = time.perf_counter() - start
    return {"ttft": (first or total + start) - start, "total": total, "text": "".join(pieces).strip()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    work, env = common.setup(args.workdir)
    name = f"bench-{args.model}"
    version = common.registered_version(name, env, work, args.model)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlflow_finetune_plugin.models.base import resolve_model_path
    from mlflow_finetune_plugin.serving.base import ModelChoice
    from mlflow_finetune_plugin.serving.choices import local_model
    from mlflow_finetune_plugin.serving.transformers_engine import TransformersEngine, _eos_ids

    torch.set_grad_enabled(False)
    choices = {"tuned": ModelChoice(name, version), "base": ModelChoice(name, version, base=True)}
    local = local_model(choices["tuned"])
    engine = TransformersEngine(device="cpu")
    for choice in choices.values():
        engine.prepare(choice)
    path = resolve_model_path(local.base_ref)
    plain = {"base": AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
             "tuned": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path,
                                                                                     dtype=torch.float32),
                                                str(local.adapter_dir)).eval()}
    tokenizer = AutoTokenizer.from_pretrained(local.tokenizer_dir)
    eos = _eos_ids(tokenizer, plain["base"])
    row = json.loads((common.SUPPORT_BOT / "data" / "eval.jsonl").read_text().splitlines()[0])
    messages = [m for m in row["messages"] if m["role"] != "assistant"]

    pairs = [(side, which) for which in ("tuned", "base") for side in ("engine", "plain")]
    results = {pair: [] for pair in pairs}
    for rep in range(args.reps + 1):  # rep 0 warms every path up and is dropped
        common.log(f"rep {rep}/{args.reps}" + (" (warm-up)" if rep == 0 else ""))
        for side, which in common.rotated(pairs, rep):
            r = (engine_generate(engine, choices[which], messages, args.max_new_tokens) if side == "engine"
                 else plain_generate(plain[which], tokenizer, messages, args.max_new_tokens, eos))
            if rep:
                results[(side, which)].append(r)

    common.header(
        f"Serving, streaming: the playground's transformers engine vs plain `generate`; {args.model} and "
        f"a LoRA version of it, greedy, up to {args.max_new_tokens} new tokens, {args.reps} reps: median "
        f"(range)")
    rows = []
    for which in ("tuned", "base"):
        eng, pln = results[("engine", which)], results[("plain", which)]
        for e, q in zip(eng, pln):  # greedy: the same answer, so the same number of tokens
            e["tokens"] = q["tokens"]
        tps = {k: [r["tokens"] / r["total"] for r in runs] for k, runs in (("engine", eng), ("plain", pln))}
        rows.append([which, str(pln[0]["tokens"]), common.summary(1000 * r["ttft"] for r in eng),
                     common.summary(1000 * r["ttft"] for r in pln),
                     common.summary(common.ratios([r["ttft"] for r in eng], [r["ttft"] for r in pln])),
                     common.summary(tps["engine"]), common.summary(tps["plain"]),
                     common.summary(common.ratios(tps["engine"], tps["plain"])),
                     "yes" if all(e["text"] == q["text"] for e, q in zip(eng, pln)) else "**no**"])
    print(common.table(["model", "new tokens", "TTFT engine (ms)", "TTFT plain (ms)", "TTFT engine / plain",
                        "tokens/s engine", "tokens/s plain", "tokens/s engine / plain", "same answer"], rows))


if __name__ == "__main__":
    main()
