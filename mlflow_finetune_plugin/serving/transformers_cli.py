"""`python -m mlflow_finetune_plugin.serving.transformers_cli serve ...`: transformers' own command line, with
the chat templates' clock pinned to `template_clock.PINNED_DATE`.

A template that renders today's date (gpt-oss's system block, Llama 3.x's "Today Date") was rendered at the
pinned date in training, evaluation and the logged model's `predict`; `transformers serve` renders every
request itself, so without the pin the served prompt would change with the day and differ from the one the
model learned on (the tiny gpt-oss LoRA answered otherwise than its `predict` on 2026-11-26). Nothing else
changes.
"""

from __future__ import annotations

if __name__ == "__main__":
    from transformers.cli.transformers import main

    from mlflow_finetune_plugin.models.template_clock import pinned_clock

    with pinned_clock():
        main()
