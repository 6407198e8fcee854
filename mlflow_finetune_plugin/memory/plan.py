"""The memory plan of a recipe: each part of a training step's peak, from the model's configuration, the
recipe and the data's longest rows, and the settings that fit a memory size. The one estimate the `plan`
command, the backend (before any weight loads) and the studio's Check all call.

The parts (docs/gpu.md; DESIGN.md "Memory of a fine-tune, by part"):
- weights: the frozen base at its dtype; 4-bit NF4 is half a byte a parameter plus its absmax constants (one
  fp32 per 64 weights, or 8 bits per 64 and one fp32 per 256 blocks with double quantization), 8-bit one byte
  plus a scale per row; the embeddings, the LM head and the norms stay unquantized, in fp32 once PEFT's
  `prepare_model_for_kbit_training` has run;
- adapter: the parameters the adapter adds, in fp32 (PEFT keeps adapters in fp32 over a bf16 base);
- gradients: one per TRAINABLE parameter, at its dtype; optimizer: AdamW's two states per trainable parameter,
  at its dtype. Frozen parameters take neither (the error of DeepSpeed's estimator, deepspeed#5304);
- activations: what autograd keeps, traced on the meta device (`trace.py`) for the attention kernel in use;
  with gradient checkpointing one hidden state per layer plus one layer recomputed;
- logits: the LM head's output with its loss (vocabulary x tokens, fp32, and its gradient), or a chunk of it
  where the head runs in chunks (`train.fused_lm_head`, models/lm_head.py);
- overhead: on a GPU the CUDA context and the allocator's slack beyond `max_memory_allocated`; on a CPU the
  process's own resident memory once its libraries are loaded, so that the CPU peak compares with the run's
  `train/peak_rss_gib`.

The backward pass frees activations as it makes gradients, so the step's peak holds the larger of (activations
+ logits + the LM head's gradient, the first one made) and gradients, not both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.memory.sizes import gib

# The CUDA context and kernels (nvidia-smi's memory beyond `max_memory_allocated`), and the caching
# allocator's fragmentation as a share of the peak: a margin the fit keeps, not a measurement.
CUDA_CONTEXT = 600 * 2**20
ALLOCATOR_SLACK = 0.05
# The C library's allocator keeps part of what a step frees (its dynamic mmap threshold moves a step's
# tensors into the heap): the resident memory a CPU step reaches stands this share above the tensors it holds
# (docs/benchmarks.md, "The memory plan against measured memory").
CPU_ALLOCATOR_SLACK = 0.10
BATCHES = (64, 32, 16, 8, 4, 2, 1)
# Tokens per step from which the fit keeps gradient checkpointing off rather than take a larger batch with it:
# recomputing the forward pass costs about a third more compute, while a step of this many tokens already
# gives the matmuls full-size tiles (a choice, not a measurement: rows per update stay the same either way).
FULL_STEP_TOKENS = 4096
AUTO_BATCH = 8  # `train.batch_size: auto`: rows per optimizer update to keep, as the schema's default
# A trace's row length: long enough that per-token costs dominate, short enough to stay cheap.
TRACE_TOKENS = 512


@dataclass
class Setting:
    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    max_length: int
    peak: int  # bytes, overhead included

    def line(self) -> str:
        return (f"batch_size {self.batch_size}, grad_accum {self.grad_accum}, gradient_checkpointing "
                f"{str(self.gradient_checkpointing).lower()}, max_length {self.max_length}: {gib(self.peak)}")


@dataclass
class Plan:
    model: str
    device: str
    params: int
    trainable: int
    tokens: int  # per row: the data's longest row within max_length (packed: max_length)
    setting: Setting  # the recipe's own settings
    parts: dict  # name -> bytes, at the recipe's settings
    per_token: dict  # activations per token: {"no checkpointing": bytes, "checkpointing": bytes}
    memory: int | None = None  # the memory planned for (None: not given)
    fits: bool | None = None
    choice: Setting | None = None  # what fits `memory` (None: nothing does)
    needs: int | None = None  # the least memory it would take (batch 1, checkpointing, 4-bit)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return self.setting.peak

    def as_dict(self) -> dict:
        return asdict(self) | {"peak": self.peak}

    def report(self) -> str:
        rows = [f"Memory plan of {self.model} on {self.device}: {self.params / 1e9:.3g}B parameters, "
                f"{self.trainable / 1e6:.4g}M trained, rows of {self.tokens} tokens"]
        width = max(len(k) for k in self.parts)
        rows += [f"  {k:<{width}}  {gib(v):>11}" for k, v in self.parts.items()]
        rows.append(f"  {'peak':<{width}}  {gib(self.peak):>11}   ({self.setting.line()})")
        rows.append("  activations per token: " + ", ".join(f"{k} {v / 2**20:.2f} MiB"
                                                           for k, v in self.per_token.items()))
        if self.memory is not None:
            if self.choice is not None:
                rows.append(f"Fits {gib(self.memory)}: {self.choice.line()}" if not self.fits or
                            self.choice != self.setting else f"Fits {gib(self.memory)} as it is.")
            else:
                rows.append(f"Does not fit {gib(self.memory)} even at batch 1 with gradient checkpointing "
                            f"and a 4-bit base: it needs at least {gib(self.needs)}.")
        rows += [f"Note: {n}" for n in self.notes]
        return "\n".join(rows)


def _dtypes(recipe, device: str):
    """(weights' bytes per parameter, the dtype the step computes in) as training would choose them."""
    import torch

    named = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if recipe.model.dtype != "auto":
        weights = named[recipe.model.dtype]
    else:
        weights = torch.bfloat16 if device == "cuda" else torch.float32
    compute = weights
    if device == "cpu" and weights == torch.float32:
        from mlflow_finetune_plugin.models.precision import recipe_autocast_bf16

        asked = recipe.train.precision
        if asked == "bf16" or (asked == "auto" and recipe_autocast_bf16(recipe)):
            compute = torch.bfloat16
    return weights, compute


def _weights(shape, recipe, weight_dtype, compute) -> int:
    """The frozen base (everything under `full`, whose parameters are the weights)."""
    per = weight_dtype.itemsize
    rest = shape.total - shape.linear
    q = recipe.model.quantization
    # PEFT's prepare_model_for_kbit_training (train/quantization.py) puts every unquantized weight in fp32
    if q == "4bit":
        absmax = (1 / 64 + 4 / (64 * 256)) if recipe.model.double_quant else 4 / 64
        return int(shape.linear * (0.5 + absmax) + rest * 4)
    if q == "8bit":
        return int(shape.linear * 1.0 + rest * 4)
    if compute.itemsize < per and recipe.adapter.type == "lora":
        # CPU bf16 autocast holds the LoRA layers' frozen weights in bf16 (models/precision.py)
        return int(shape.linear * compute.itemsize + rest * per)
    return shape.total * per


def _head_bytes(recipe, device, acts, tokens, vocab, hidden) -> int:
    """The LM head with its loss for a batch of `tokens` tokens: all the logits, or a chunk at a time."""
    from mlflow_finetune_plugin.models.lm_head import chunk_tokens

    head = recipe.train.fused_lm_head
    if head == "auto":
        head = True if device == "cuda" else "chunked"
    if head is False or recipe.objective != "sft":
        # kept for the backward pass (as traced), and the loss's gradient and the logits' at its peak
        return int(acts.head * tokens / acts.tokens + 2 * 4 * tokens * vocab)
    return int(2 * 4 * min(tokens, chunk_tokens(vocab)) * vocab + 4 * tokens * hidden)


def _step(shape, recipe, device, acts, batch, checkpointing, tokens, weights, overhead) -> tuple[int, dict]:
    per_row = tokens / acts.tokens
    layers = shape.layers
    if checkpointing:
        activations = (layers * acts.layer_input + acts.per_layer + acts.decoder_rest) * per_row * batch
    else:
        activations = (layers * acts.per_layer + acts.decoder_rest) * per_row * batch
    logits = _head_bytes(recipe, device, acts, tokens * batch, shape.vocab, shape.hidden)
    full = recipe.adapter.type == "full"
    trainable_dtype = weights if full else 4
    parts = {
        "weights": 0,
        "adapter": shape.adapter * 4,
        "gradients": shape.trainable * trainable_dtype,
        "optimizer (AdamW)": 2 * shape.trainable * trainable_dtype,
        "activations": int(max(activations, 0)),
        "logits": logits,
        "overhead": overhead,
    }
    # the LM head's gradient (a tied head's: the embedding's) comes first in the backward pass, while the
    # activations are all still held
    head_gradient = (shape.head or shape.embedding) * trainable_dtype if full else 0
    # a tied embedding's own gradient, made dense at the end of the backward pass, is added to the head's
    # out of place: two more of its size for a moment
    tied = 2 * shape.embedding * trainable_dtype if full and not shape.head else 0
    moving = max(parts["activations"] + logits + head_gradient, parts["gradients"] + tied)
    fixed = parts["adapter"] + parts["optimizer (AdamW)"] + overhead
    return fixed + moving, parts


def plan(recipe, device_memory: int | None = None, device: str | None = None, longest: int | None = None,
         overhead: int | None = None) -> Plan:
    """The memory plan of `recipe` on `device` (`cuda`, `cpu`; default: CUDA where there is one), for rows of
    `longest` tokens (the data's longest row; default and cap: `data.max_length`; packed rows are always
    `max_length`), and the setting that fits `device_memory` bytes where given. Reads the model's
    configuration, never its weights."""
    import torch

    from mlflow_finetune_plugin.memory import shape as shapes
    from mlflow_finetune_plugin.memory.trace import traced

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = shapes.model_config(recipe.model)
    shape = shapes.count(config, recipe)
    weight_dtype, compute = _dtypes(recipe, device)
    attention = recipe.model.attn_implementation or "sdpa"
    acts = traced(config, recipe, compute, attention, TRACE_TOKENS)
    max_length = recipe.data.max_length
    packed = recipe.data.packing is True
    tokens = max_length if packed or not longest else min(longest, max_length)
    if overhead is None:
        overhead = CUDA_CONTEXT if device == "cuda" else _baseline_rss()
    weights = _weights(shape, recipe, weight_dtype, compute)
    full_dtype = weight_dtype.itemsize

    def peak(batch, checkpointing, length=tokens, base=weights):
        total, parts = _step(shape, recipe, device, acts, batch, checkpointing, length, full_dtype, overhead)
        parts["weights"] = base
        total += base
        if device == "cuda":
            total = int(total * (1 + ALLOCATOR_SLACK))
        else:
            total = overhead + int((total - overhead) * (1 + CPU_ALLOCATOR_SLACK))
        return total, parts

    batch = recipe.train.batch_size if isinstance(recipe.train.batch_size, int) else AUTO_BATCH
    accum = recipe.train.grad_accum
    ckpt = recipe.train.gradient_checkpointing
    ckpt = bool(ckpt) if isinstance(ckpt, bool) else False
    total, parts = peak(batch, ckpt)
    result = Plan(model=recipe.model.name or "tiny", device=device, params=shape.total,
                  trainable=shape.trainable, tokens=tokens,
                  setting=Setting(batch, accum, ckpt, max_length, total), parts=parts,
                  per_token={"no checkpointing": int(shape.layers * acts.per_layer / acts.tokens),
                             "checkpointing": int(shape.layers * acts.layer_input / acts.tokens)})
    if device == "cpu":
        result.notes.append("the CPU peak includes this process's own memory with its libraries loaded "
                            "(overhead), as the run's train/peak_rss_gib does")
    if device_memory is None:
        return result
    result.memory = device_memory
    asked = recipe.train.gradient_checkpointing
    # prefix tuning cannot checkpoint (train/adapters/prefix.py); an explicit `true` stays on, and so does an
    # explicit `false` beside `batch_size: auto` (the batch is chosen for it); otherwise both are suggested
    kept = asked is True or (asked is False and recipe.train.batch_size == "auto")
    options = (False,) if recipe.adapter.type == "prefix" else (asked,) if kept else (False, True)
    result.choice = fit(peak, batch * accum, options, recipe, device_memory, tokens)
    result.fits = total <= device_memory
    if result.choice is None:
        four_bit = _weights(shape, recipe.model_copy(update={"model": recipe.model.model_copy(
            update={"quantization": "4bit"})}), weight_dtype, compute) if recipe.adapter.type != "full" \
            else weights
        result.needs = peak(1, True, base=four_bit)[0]
    return result


def fit(peak, rows: int, checkpointing: tuple, recipe, memory: int, tokens: int) -> Setting | None:
    """The setting that fits `memory`: the largest batch (at most `rows`, the rows per optimizer update, kept
    by gradient accumulation) without gradient checkpointing where its steps reach FULL_STEP_TOKENS, else
    checkpointing where it lets a larger batch fit (`checkpointing`: the choices allowed); then shorter rows.
    None where nothing fits at the smallest batch (1; 2 for KTO, whose KL term needs another row of the
    batch)."""
    smallest = 2 if recipe.objective == "kto" else 1
    max_length = recipe.data.max_length
    lengths = [max_length]
    while lengths[-1] > 256:
        lengths.append(lengths[-1] // 2)
    for length in lengths:
        used = min(tokens, length)
        options = []
        for ckpt in checkpointing:
            for batch in (b for b in BATCHES if smallest <= b <= max(rows, smallest)):
                total = peak(batch, ckpt, used)[0]
                if total <= memory:
                    options.append(Setting(batch, max(1, rows // batch), ckpt, length, total))
                    break
        plain = [s for s in options if not s.gradient_checkpointing]
        if plain and (plain[0].batch_size * used >= FULL_STEP_TOKENS or len(options) == 1):
            return plain[0]
        if options:
            return max(options, key=lambda s: (s.batch_size, not s.gradient_checkpointing))
    return None


def _baseline_rss() -> int:
    """This process's resident memory now, once torch, transformers and PEFT are loaded (the plan's own trace
    loaded them): the training process carries as much before its first weight."""
    import mlflow  # noqa: F401
    import trl  # noqa: F401 - the training process loads TRL and MLflow too

    from mlflow_finetune_plugin.runtime.allocator import rss_bytes

    return rss_bytes() or 0


def check_fits(result: Plan) -> None:
    """Raise when `result` (planned with a device memory) does not fit, naming what does."""
    if result.memory is None or result.fits:
        return
    if result.choice is not None:
        c = result.choice
        raise FinetuneError(
            f"the recipe needs {gib(result.peak)} on this {gib(result.memory)} device "
            f"({result.setting.line()}); this fits: -P train.batch_size={c.batch_size} "
            f"-P train.grad_accum={c.grad_accum} -P train.gradient_checkpointing="
            f"{str(c.gradient_checkpointing).lower()} -P data.max_length={c.max_length} "
            "(or train.batch_size: auto and train.gradient_checkpointing: auto). "
            "See it with `mlflow-finetune plan`.")
    raise FinetuneError(
        f"the recipe cannot fit this {gib(result.memory)} device even at batch 1 with gradient "
        f"checkpointing and a 4-bit base: it needs at least {gib(result.needs)}. Use a smaller model or a "
        "larger device.")


def data_longest(recipe) -> tuple[int | None, str]:
    """(the longest training row in tokens, where it was read) by the data check's count (the model's
    tokenizer, rows rendered and cut as training does); (None, why not) where the tokenizer or the files are
    not at hand, and the plan then takes `data.max_length`."""
    from mlflow_finetune_plugin.data.check import check_data
    from mlflow_finetune_plugin.data.splits import data_files
    from mlflow_finetune_plugin.data.token_check import tokenizer_for_check

    if recipe.data.documents or (recipe.distill is not None and recipe.distill.teacher):
        return None, "the rows are written once the run starts"
    files = [f for f in data_files(recipe) if f[0].endswith(".train")]
    if not files:
        return None, "no training file"
    tokenizer, why_not = tokenizer_for_check(recipe.model.name, recipe.model.revision,
                                             recipe.model.trust_remote_code, recipe.model.chat_template,
                                             recipe.project_dir)
    if tokenizer is None:
        return None, why_not
    longest = []
    for _label, path, fmt, system_prompt in files:
        report = check_data(path, fmt=fmt, tokenizer=tokenizer, max_length=recipe.data.max_length,
                            system_prompt=system_prompt)
        if report.token_stats:
            longest.append(report.token_stats["max"])
    if not longest:
        return None, "no row could be counted"
    return max(longest), ", ".join(f[0] for f in files)
