"""What the family-matrix tests share (tests/test_family_matrix.py, test_system_prompts.py,
test_base_models.py): the families and what each one's template ends a turn with, a conversation that
exercises a template (system message, two turns), forcing what a model generates, and catching warnings our
own modules raise.

Imports nothing heavy at module level: conftest-light test files stay light.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

from mlflow_finetune_plugin.models.tiny_families import FAMILIES as _FAMILIES

# llama3, qwen2.5, qwen3, gemma3, mistral, phi3.5, gemma4, qwen3.5, qwen3.5-think, gpt-oss
FAMILIES = list(_FAMILIES)
ROWS = [*FAMILIES, "tiny"]  # the built-in tiny model is the plain ChatML row
# CI has 45 minutes: the tests that train a family model end to end run five families by default, each with a
# quirk of its own (Gemma 3: its end of turn is not its eos, and its template folds the system message;
# Mistral v0.3: the plugin folds it, and its LM head is untied; Qwen3: the think block; Qwen3.5: a hybrid
# cache of linear-attention and full-attention layers, and a generation prompt that closes an empty think
# block; gpt-oss: a mixture of experts and harmony channels), the others with `-m stress`. Every family's loss
# mask, stop ids and refused rows are checked in-process in the default run.
END_TO_END = ("gemma3", "mistral", "qwen3", "qwen3.5", "gpt-oss")


def end_to_end(rows) -> list:
    """`rows` as parameters, those outside END_TO_END marked stress."""
    import pytest

    return [pytest.param(row, marks=[] if row in END_TO_END else [pytest.mark.stress]) for row in rows]

# The token each family's chat template closes an assistant turn with (written out, not read from the code
# under test: the real models' templates, as tests/test_families.py checks them).
END_OF_TURN = {"llama3": "<|eot_id|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>",
               "gemma3": "<end_of_turn>", "mistral": "</s>", "phi3.5": "<|end|>", "gemma4": "<turn|>",
               "qwen3.5": "<|im_end|>", "qwen3.5-think": "<|im_end|>", "gpt-oss": "<|return|>",
               "tiny": "<|im_end|>"}
# Where an earlier reply ends otherwise (harmony: <|return|> ends the final answer only, <|end|> every other
# message).
EARLIER_END_OF_TURN = {"gpt-oss": "<|end|>"}
# What the model writes ahead of its reply after the generation prompt, in the last turn and in earlier ones:
# Qwen3's empty think block, the close of the block qwen3_5_think's generation prompt opens, gpt-oss's final
# channel.
LAST_LEAD = {"qwen3": "<think>\n\n</think>\n\n", "qwen3.5-think": "\n</think>\n\n",
             "gpt-oss": "<|channel|>final<|message|>"}
EARLIER_LEAD = {"gpt-oss": "<|channel|>final<|message|>"}
# Templates that leave a system message out of a row ending with the answer: it is folded into the first user
# turn.
FOLDS_SYSTEM = {"mistral"}

CONVERSATION = [{"role": "system", "content": "Answer in French."},
                {"role": "user", "content": "Where is the station?"},
                {"role": "assistant", "content": "La gare est ici."},
                {"role": "user", "content": "And the bank?"},
                {"role": "assistant", "content": "La banque est là."}]


def model_name(row: str) -> str:
    """The built-in model of a matrix row: `tiny`, or `tiny-<family>`."""
    return row if row == "tiny" else f"tiny-{row}"


def registered_name(row: str) -> str:
    return "matrix-" + row.replace(".", "-")


def write_chat_project(root: Path, name: str, n: int = 8) -> Path:
    """A project of `n` training rows (a system message, two turns each) and 2 held-out ones, registered as
    `name`."""
    def row(i):
        return {"messages": [{"role": "system", "content": "Answer briefly."},
                             {"role": "user", "content": f"What is {i} plus {i}?"},
                             {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
                             {"role": "user", "content": "And times two?"},
                             {"role": "assistant", "content": f"That is {4 * i}."}]}

    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(row(i)) + "\n" for i in range(n)))
    (root / "data" / "eval.jsonl").write_text("".join(json.dumps(row(i)) + "\n" for i in range(50, 52)))
    (root
     / "finetune.yaml").write_text("data: {train: data/train.jsonl, eval: data/eval.jsonl, max_length: 160}\n"
                                   f"registry: {{name: {name}}}\n")
    return root


def trained_pieces(tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """The text of each run of trained tokens (mask 1) of a tokenized row, in order."""
    pieces, run = [], []
    for token, trained in zip(ids, mask):
        if trained:
            run.append(token)
        elif run:
            pieces, run = [*pieces, run], []
    pieces += [run] if run else []
    return [tokenizer.decode(p) for p in pieces]


class Script:
    """A generation forced token by token, whatever the weights say: after the prompt come `words` (ordinary
    tokens) then `stop`, then `filler` for ever. A generator that stops at `stop` answers `text`; one that
    does not runs on with filler to its token limit."""

    def __init__(self, tokenizer, stop: str, words: str = "Bonjour", filler: str = " garbage"):
        ids = tokenizer(words, add_special_tokens=False)["input_ids"]
        fill = tokenizer(filler, add_special_tokens=False)["input_ids"][0]
        assert len(set(ids)) == len(ids) and fill not in ids, (words, ids, fill)
        self.stop_id = tokenizer.convert_tokens_to_ids(stop)
        self.first, self.fill = ids[0], fill
        self.next = {**dict(zip(ids, ids[1:])), ids[-1]: self.stop_id, self.stop_id: fill, fill: fill}
        self.text = tokenizer.decode(ids)
        self.ids = [*ids, self.stop_id]

    def _hook(self, module, args, kwargs, output):
        import torch

        logits = getattr(output, "logits", None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not isinstance(ids, torch.Tensor):
            return None
        last = logits[:, -1, :]
        last.fill_(-1e4)  # in place: every wrapper (PeftModel, the causal LM) hands on this same output
        for row, token in enumerate(ids[:, -1].tolist()):
            last[row, self.next.get(token, self.first)] = 1e4
        return None

    @contextlib.contextmanager
    def forced(self):
        """Every model forward in this process (pyfunc, engines, a plain `generate`) picks the scripted
        token."""
        import torch

        handle = torch.nn.modules.module.register_module_forward_hook(self._hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()


@contextlib.contextmanager
def own_warnings():
    """Records every warning; yields a list that, on exit, holds the Future/DeprecationWarnings whose location
    is a module of this package (what `generate(..., past_key_values=...)` on transformers 5.2x would
    raise)."""
    found: list[str] = []
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        yield found
    found += [f"{r.filename}:{r.lineno}: {r.category.__name__}: {r.message}" for r in records
              if issubclass(r.category, (FutureWarning, DeprecationWarning))
              and "mlflow_finetune_plugin" in Path(r.filename).parts]
