"""One process measuring training steps' memory for tests/test_memory_measured.py (run as a script, one
process per model so that each baseline is this process's own):

    python tests/memory_worker.py MODEL_DIR METHOD[,METHOD] TOKENS [TOKENS ...]

With torch, transformers, PEFT, TRL and MLflow imported (what a training process carries before its first
weight), the resident memory is the baseline. Then for each method and row length, in the order given
(smallest peak first): the random model of MODEL_DIR's config in fp32 with the recipe's adapter attached by
the project's own code, two optimizer steps (AdamW's states exist from the first step on, so the second step
holds them with the activations), batch 1, the loss over all the logits
(`train.fused_lm_head: false`). The peak
resident memory (VmHWM, as `train/peak_rss_gib`; reset before each case through /proc/self/clear_refs) is
printed as one JSON line per case.
"""

from __future__ import annotations

import gc
import json
import sys


def _status(key: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main(model_dir: str, methods: list[str], lengths: list[int]) -> None:
    import mlflow  # noqa: F401 - the training process's libraries, loaded before the baseline
    import peft  # noqa: F401
    import torch
    import transformers
    import trl  # noqa: F401

    from mlflow_finetune_plugin.config.schema import Recipe
    from mlflow_finetune_plugin.train.adapters import adapter_of

    torch.set_num_threads(1)
    gc.collect()
    baseline = _status("VmRSS:")
    config = transformers.AutoConfig.from_pretrained(model_dir)
    config._attn_implementation = "sdpa"
    for method, tokens in [(m, t) for m in methods for t in lengths]:
        recipe = Recipe.model_validate({"adapter": {"type": method}})
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        module = adapter_of(recipe)
        if module.ARTIFACT != "full":
            for p in model.parameters():
                p.requires_grad_(False)
        model = module.apply(model, recipe.adapter)
        model.train()
        # the Trainer's default (`adamw_torch_fused`), which the training process runs with
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
        ids = torch.randint(0, config.vocab_size, (1, tokens))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM from here
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
        print(json.dumps({"method": method, "tokens": tokens, "baseline": baseline,
                          "peak": _status("VmHWM:")}), flush=True)
        del model, optimizer
        gc.collect()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","), [int(t) for t in sys.argv[3:]])
