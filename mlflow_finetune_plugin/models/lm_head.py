"""The LM head over chunks of tokens: losses and log-probabilities without the (tokens x vocabulary) logits.

With Gemma 3's 262,144-word vocabulary the logits of 2 rows of 256 tokens take 537 MB in fp32, and their
log-softmax and its gradient as much again each; the KL replay term builds them twice. Here the model runs as
usual up to its LM head, which computes nothing (`hidden_states` records what would have reached it), and the
head is then applied to a chunk of tokens at a time, only at the positions the caller scores, each chunk
reduced to what the caller needs before the next one is computed:

- `token_logprobs`: each token's log-probability and whether it was the top prediction (evaluation, no
gradient);
- `cross_entropy`: the summed cross-entropy (the SFT loss);
- `kl_divergence`: the summed KL(base || tuned) of two passes' hidden states (the replay term).

With gradients, each chunk's gradient is taken in the forward pass, as Liger's fused linear cross-entropy
does: the chunk's logits are turned into their own gradient in place, multiplied back through the head at
once, and only the gradients of the head's inputs are kept ([tokens, hidden], and the head's trainable rows);
the backward pass scales them. No chunk is computed twice. Liger's kernel and Apple's Cut Cross-Entropy need
Triton (a GPU); TRL's chunked log-probabilities run on a CPU as torch ops, but recompute every tile in the
backward pass and read the head's `weight` (with PEFT's trainable tokens, a merged copy of the whole matrix
and a gradient for all of it).

The head is what `head_of` recognises: a plain `nn.Linear`, or PEFT's trainable-token wrapper around one (a
template's control tokens trained under LoRA, tied to the embedding or not), whose rows are the base weight's
except the trained ones. Anything else (LoRA on the LM head, `modules_to_save`, a quantized head, logit
scaling other than Gemma's soft-capping, a head sharded by FSDP, offloaded, or a model split across devices)
gives None, and callers keep the model's own logits. The head computes in its weight's dtype
with autocast off, as `models/precision.py` keeps it in fp32 under CPU bf16 autocast; softmax and sums in
fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

# Logits held at once per chunk: 2**26 fp32 values are 256 MiB (256 tokens of Gemma 3, 1365 of SmolLM2). Each
# chunk's matmuls read the whole head weight, so much smaller chunks are bound by memory bandwidth
# (docs/benchmarks-history.md, section 8).
CHUNK_ELEMENTS = 2 ** 26
# Config attributes by which some families scale their logits after the head (TRL's fused head lists the
# same):
# not reproduced here, so such models keep their own logits.
SCALED_LOGITS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


@dataclass(frozen=True)
class Head:
    """An LM head as tensors: logits = hidden @ weight.T + bias, except the columns `rows`, which come from
    `row_weight` (PEFT trainable tokens), then Gemma-style soft-capping `softcap * tanh(logits / softcap)`."""
    weight: Any
    bias: Any = None
    rows: Any = None
    row_weight: Any = None
    softcap: float | None = None

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def without_rows(self) -> Head:
        """The head with its trained rows switched off (the base model's, as under `disable_adapter()`)."""
        return Head(self.weight, self.bias, softcap=self.softcap)

    def raw_logits(self, hidden):
        """[tokens, vocab] fp32 logits before soft-capping, in the weight's dtype with autocast off."""
        import torch

        dtype = self.weight.dtype
        h = hidden.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            logits = h @ self.weight.t()
            if self.bias is not None:
                logits += self.bias.to(dtype)
            if self.rows is not None:
                logits[:, self.rows] = h @ self.row_weight.to(dtype).t()
        return logits.float()


def head_of(model) -> Head | None:
    """The model's LM head as a `Head`, or None where it is something this module does not reproduce
    exactly."""
    import torch

    module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = model.config.get_text_config()
    if (
        module is None
        or any(getattr(config, name, None) is not None for name in SCALED_LOGITS)
        or len(set(getattr(model, "hf_device_map", {}).values())) > 1
    ):  # split across devices: left as it is
        return None
    softcap = getattr(config, "final_logit_softcapping", None)
    if type(module) is torch.nn.Linear:
        return Head(module.weight, module.bias, softcap=softcap) if _plain(module.weight) else None
    try:
        from peft.utils.other import TrainableTokensWrapper
    except ImportError:
        return None
    if not isinstance(module, TrainableTokensWrapper):
        return None
    layer = module.token_adapter
    base = layer.base_layer
    # PEFT's trainable-token head computes F.linear(x, merged weight), without a bias.
    if type(base) is not torch.nn.Linear or base.bias is not None or layer.merged or not _plain(base.weight):
        return None
    active = [] if layer.disable_adapters else list(layer.active_adapters)
    if not active:
        return Head(base.weight, softcap=softcap)
    if len(active) > 1 or active[0] not in layer.token_indices:
        return None
    rows = torch.tensor(layer.token_indices[active[0]], device=base.weight.device)
    return Head(base.weight, rows=rows, row_weight=layer.trainable_tokens_delta[active[0]], softcap=softcap)


def _plain(weight) -> bool:
    """A weight held whole on a real device: not an FSDP shard (DTensor) nor offloaded (meta)."""
    import torch

    return type(weight.data) is torch.Tensor and weight.device.type != "meta"


@contextlib.contextmanager
def hidden_states(model):
    """Within it, the model's LM head computes nothing: each forward pass appends the hidden states that reach
    the head ([batch, positions, hidden]) to the yielded list and gets logits with an empty vocabulary
    back."""
    head = model.get_output_embeddings()
    captured: list = []
    previous = head.__dict__.get("forward")

    def capture(hidden, *args, **kwargs):
        captured.append(hidden)
        return hidden.new_empty((*hidden.shape[:-1], 0))

    head.forward = capture
    try:
        yield captured
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def chunk_tokens(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def token_logprobs(head: Head, hidden, targets):
    """(log-probability of each target [tokens] in fp32, whether it was the top prediction [tokens]) of
    `hidden` ([tokens, hidden]) through `head`, without gradients."""
    import torch

    logps, top1 = [], []
    step = chunk_tokens(head.vocab)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], step):
            z, _ = _capped(head, head.raw_logits(hidden[start:start + step]))
            t = targets[start:start + step]
            logps.append(z.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(z, -1))
            top1.append(z.argmax(-1) == t)
    if not logps:
        return hidden.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool,
                                                                     device=hidden.device)
    return torch.cat(logps), torch.cat(top1)


def cross_entropy(head: Head, hidden, targets):
    """(summed cross-entropy of `targets` given `hidden` [tokens, hidden], differentiable; number of tokens
    whose target was the top prediction). The mean or a division by the batch's items is the caller's."""
    task = _CrossEntropy(targets)
    return _run(task, head, hidden), task.top1


def kl_divergence(head: Head, hidden, base_head: Head, base_hidden):
    """Summed KL(base || tuned) over the tokens: the base model's next-token distribution from `base_hidden`
    through `base_head` (no gradient), the tuned one's from `hidden` through `head`."""
    return _run(_BaseKL(base_head, base_hidden.detach()), head, hidden)


def _run(task, head: Head, hidden):
    import torch

    tensors = (hidden, head.weight, head.bias, head.row_weight)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _ChunkedLoss.apply(*tensors, task, head)
    with torch.no_grad():
        return task.loss(head, hidden, ())[0]


class _ChunkedLoss:
    """torch.autograd.Function (made on first use, so that importing this module does not import torch)."""

    _function = None

    @classmethod
    def apply(cls, *args):
        if cls._function is None:
            cls._function = _autograd_function()
        return cls._function.apply(*args)


def _autograd_function():
    import torch

    class ChunkedLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, row_weight, task, head):
            wanted = tuple(t is not None and t.requires_grad for t in (hidden, weight, bias, row_weight))
            loss, grads = task.loss(head, hidden, wanted)
            ctx.save_for_backward(*grads)
            return loss

        @staticmethod
        def backward(ctx, grad):
            return (*(None if g is None else g * grad for g in ctx.saved_tensors), None, None)

    return ChunkedLoss


def _capped(head: Head, raw):
    """(logits after soft-capping, tanh(raw / softcap) for the gradient, or None without soft-capping)."""
    if head.softcap is None:
        return raw, None
    t = raw.div_(head.softcap).tanh_()
    return t * head.softcap, t


def _accumulate(head: Head, h, g, grads: list, start: int, end: int) -> None:
    """Add a chunk's share of the gradients: `g` [tokens, vocab] is d(loss)/d(logits before soft-capping) of
    the chunk's hidden states `h`; grads = [hidden, weight, bias, row_weight], None where not wanted."""
    dtype = head.weight.dtype
    g_in = g.to(dtype)
    if grads[0] is not None:
        grads[0][start:end] = (g_in @ head.weight).float()
        if head.rows is not None:  # those columns came from row_weight, not from weight's rows
            delta = head.row_weight.float() - head.weight[head.rows].float()
            grads[0][start:end] += g[:, head.rows] @ delta
    if grads[1] is not None:
        grads[1] += (g_in.t() @ h.to(dtype)).float()
    if grads[2] is not None:
        grads[2] += g.sum(0)
    if grads[3] is not None:
        grads[3] += g[:, head.rows].t() @ h.float()


def _loop(head: Head, hidden, wanted: tuple, chunk_loss):
    """Sum `chunk_loss(logits, start, end)` over chunks of tokens; with `wanted` gradients, `chunk_loss`
    leaves d(loss)/d(logits) in `logits`, and the gradients of [hidden, weight, bias, row_weight] are
    returned."""
    import torch

    wanted = tuple(wanted) + (False,) * (4 - len(wanted))
    like = (hidden, head.weight, head.bias, head.row_weight)
    grads = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) if w else None for t,
             w in zip(like, wanted)]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    step = chunk_tokens(head.vocab)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], step):
            end = min(start + step, hidden.shape[0])
            h = hidden[start:end].detach()
            z, t = _capped(head, head.raw_logits(h))
            total += chunk_loss(z, start, end)
            if not any(wanted):
                continue
            if t is not None:  # d tanh: through the soft-capping back to the head's output
                z.mul_(t.square_().neg_().add_(1))
            _accumulate(head, h, z, grads, start, end)
    if grads[1] is not None and head.rows is not None:
        grads[1][head.rows] = 0  # rows replaced by row_weight do not reach the logits
    return total, tuple(None if g is None else g.to(x.dtype) for g, x in zip(grads, like))


class _CrossEntropy:
    def __init__(self, targets):
        self.targets, self.top1 = targets, 0

    def loss(self, head: Head, hidden, wanted: tuple):
        import torch

        top1 = []

        def chunk(z, start, end):
            t = self.targets[start:end, None]
            target_z = z.gather(1, t).squeeze(1)
            top1.append(int((z.argmax(-1) == t[:, 0]).sum()))
            peak = z.amax(-1, keepdim=True)
            z.sub_(peak).exp_()
            total = z.sum(-1, keepdim=True)
            loss = (peak + total.log()).sum() - target_z.sum()
            if any(wanted):  # softmax - one-hot: d(cross-entropy)/d(logits), in place
                z.div_(total).scatter_add_(1, t, torch.full(t.shape, -1.0, device=z.device))
            return loss

        result = _loop(head, hidden, wanted, chunk)
        self.top1 = sum(top1)
        return result


class _BaseKL:
    def __init__(self, base_head: Head, base_hidden):
        self.base_head, self.base_hidden = base_head, base_hidden

    def loss(self, head: Head, hidden, wanted: tuple):
        import torch

        def chunk(z, start, end):
            base, _ = _capped(self.base_head, self.base_head.raw_logits(self.base_hidden[start:end]))
            base -= torch.logsumexp(base, -1, keepdim=True)
            z -= torch.logsumexp(z, -1, keepdim=True)
            p_base = base.exp()
            base -= z  # log p_base - log p_tuned
            kl = torch.dot(p_base.view(-1), base.view(-1))
            if any(wanted):  # p_tuned - p_base: d KL(base || tuned)/d(tuned logits), in place
                z.exp_().sub_(p_base)
            return kl

        return _loop(head, hidden, wanted, chunk)
