"""`llamafactory-cli train CONFIG`, with the non-padding tokens of each training step counted; run by
bench/peer_llamafactory.py with the Python of LLaMA-Factory's own virtual environment (it imports nothing of
ours).

Nothing in the training changes: LLaMA-Factory's command-line entry runs as it does from the shell, and three
wrappers only count. Tokens are counted as TRL counts them for the plugin, the real tokens of each batch: the
nonzero entries of the rows' attention masks as the collator receives them (with `neat_packing` each packed
example's positions carry its number, 1, 2, ..., and padding 0; unpacked rows are not padded yet), before it
pads them or turns them into the 4D block-diagonal mask the model sees. (Plain `packing` marks padding 1: not
counted right.) The collator may run a batch ahead of the training loop (accelerate's look-ahead), so each
batch's count is queued and taken when `Trainer.training_step` takes the batch. Prints one JSON line: tokens,
the Trainer's `train_runtime`, steps, the mean training loss and the rows of one epoch (packed rows when
packing).

    .../finetune-bench-llamafactory/bin/python bench/llamafactory_train.py train.yaml
"""

from __future__ import annotations

import collections
import json
import sys


def peak_rss() -> int:
    """This process's peak resident set so far (VmHWM), in bytes."""
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def main() -> None:
    config = sys.argv[1]
    from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask
    from transformers import Trainer

    queued: collections.deque[int] = collections.deque()
    figures = {"tokens": 0}
    collate, step, train = (SFTDataCollatorWith4DAttentionMask.__call__, Trainer.training_step, Trainer.train)

    def counting_collate(self, features):
        queued.append(sum(1 for f in features for m in f["attention_mask"] if m))
        return collate(self, features)

    def counting_step(self, *args, **kwargs):
        figures["tokens"] += queued.popleft()
        return step(self, *args, **kwargs)

    def recorded_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        figures.update(seconds=result.metrics["train_runtime"], loss=result.metrics.get("train_loss"),
                       steps=self.state.global_step, packed_rows=len(self.train_dataset),
                       train_peak_rss=peak_rss())  # as the project's train/peak_rss_gib: VmHWM at the end
        return result

    SFTDataCollatorWith4DAttentionMask.__call__ = counting_collate
    Trainer.training_step = counting_step
    Trainer.train = recorded_train

    from llamafactory.cli import main as llamafactory_cli

    sys.argv = ["llamafactory-cli", "train", config]
    llamafactory_cli()
    if "seconds" not in figures:
        raise SystemExit("llamafactory-cli train returned without training")
    figures["tokens_per_s"] = figures["tokens"] / figures["seconds"]
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
