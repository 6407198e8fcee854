"""Continuous decoding for the transformers engine: one forward per step over the rows still generating.

`generate()` runs a batch until its last row ends: a short answer's row keeps being computed (as padding)
while a long one finishes, and a request that arrives meanwhile waits for the whole batch. A `Stepper` instead
holds the batch's KV cache itself, so between two steps the scheduler (batching.Batcher) can drop the rows
that ended (their cache rows go, the next step is cheaper) and add the requests that arrived (their prompts
are run once, and their cache rows join the others, left-padded and masked). Each row sees exactly its own
prompt and tokens: positions and attention come from its mask, as in a left-padded `generate()`.

It needs a plain growing cache (`models.architecture.cache_abilities(model).concat`: every layer a
DynamicLayer, no sliding window, no recurrent state, no static or quantized cache) and a generation config
with nothing beyond greedy or temperature/top-p sampling; `steppable` says whether a model qualifies, and the
engine falls back to one `generate()` per batch when it does not.
"""

from __future__ import annotations

from collections.abc import Callable

# Generation-config fields whose default means "off"; a model that sets any of them is served by `generate()`,
# which applies them (this module applies only temperature and top-p).
_PLAIN_GENERATION = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
                     "bad_words_ids": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
                     "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "sequence_bias": (None,),
                     "min_new_tokens": (None, 0), "min_length": (None, 0),
                     "encoder_repetition_penalty": (None, 1.0), "exponential_decay_length_penalty": (None,),
                     "renormalize_logits": (None, False), "epsilon_cutoff": (None, 0.0),
                     "eta_cutoff": (None, 0.0), "typical_p": (None, 1.0), "min_p": (None, 0.0),
                     "top_k": (None, 0, 50)}


def steppable(model) -> bool:
    """Whether `model` (a PreTrainedModel or a PeftModel over one) can be decoded step by step here."""
    from mlflow_finetune_plugin.models.architecture import cache_abilities

    if getattr(model, "config", None) is None or not cache_abilities(model).concat:
        return False
    generation = getattr(model, "generation_config", None)
    return all(getattr(generation, key, None) in plain for key, plain in _PLAIN_GENERATION.items())


# The shortest shared prefix worth a forward of its own (a chat template's opening alone is a few tokens).
MIN_SHARED = 8


class Stepper:
    """The live rows of one batch: their KV cache, attention mask and positions, and the next token's logits.

    `forward(ids, mask, positions, cache, adapters)` runs the model (adapters: each row's adapter name, or
    None) and returns the last position's logits; `sample(logits)` picks each row's token; `release()` is
    called once by `close()`. Rows are in the order they were added, minus those dropped by `keep`.
    """

    def __init__(self, forward: Callable, sample: Callable, config, pad_id: int, device, mixed: bool,
                 release: Callable[[], None] = lambda: None):
        self.forward, self.sample, self.config, self.release = forward, sample, config, release
        self.pad_id, self.device, self.mixed = pad_id, device, mixed
        self.cache = None        # DynamicCache: [rows, heads, length, dim] per layer
        self.mask = None         # [rows, length] long: 1 where the row has a token
        self.positions = None    # [rows] long: each row's next position (its tokens so far)
        self.adapters: list[str] = []
        self.logits = None       # [rows, vocab]: the next token's, when no token is waiting to be fed
        self.fed = None          # [rows] long: the tokens picked last step, not yet run through the model

    def add(self, prompts: list[list[int]], adapters: list[str]) -> None:
        """Run new rows' prompts and put them after the live rows.

        A prefix all the new prompts share (a system prompt and the chat template's opening, in a burst of
        users) is run once per adapter among them, not once per row; each row then runs only the rest of its
        prompt. The row's cache holds the prefix, then its own tokens after the padding of the shorter rests
        (masked).
        """
        import torch
        from transformers import DynamicCache

        self._feed()
        device = self.device
        shared = _shared_prefix(prompts) if len(prompts) > 1 else 0
        shared = shared if shared >= MIN_SHARED else 0
        cache = DynamicCache(config=self.config)
        if shared:
            kinds = list(dict.fromkeys(adapters))
            prefix = torch.tensor([prompts[0][:shared]] * len(kinds), device=device)
            ones = torch.ones_like(prefix)
            self.forward(prefix, ones, (ones.cumsum(-1) - 1), cache, kinds if self.mixed else None)
            index = torch.tensor([kinds.index(a) for a in adapters], device=device)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
        rests = [p[shared:] for p in prompts]
        width = max(len(r) for r in rests)
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rests], device=device)
        own = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rests], device=device)
        mask = torch.cat([torch.ones((len(rests), shared), dtype=own.dtype, device=device), own], dim=-1)
        positions = shared + (own.cumsum(-1) - 1).clamp(min=0)
        logits = self.forward(ids, mask, positions, cache, adapters if self.mixed else None)
        if self.cache is None:
            self.cache, self.mask, self.logits = cache, mask, logits
            self.positions = mask.sum(-1)
        else:
            self._merge(cache, mask)
            self.logits = torch.cat([self.logits, logits])
            self.positions = torch.cat([self.positions, mask.sum(-1)])
        self.adapters += adapters

    def step(self) -> list[int]:
        """Each live row's next token (the model runs the previous step's tokens first)."""
        self._feed()
        tokens = self.sample(self.logits)
        self.fed, self.logits = tokens, None
        return tokens.tolist()

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (indices into the live rows), in this order; drop the others' cache."""
        import torch

        index = torch.tensor(rows, device=self.device)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.adapters = [self.adapters[i] for i in rows]
        if self.fed is not None:
            self.fed = self.fed[index]
        if self.logits is not None:
            self.logits = self.logits[index]
        self._trim()

    def close(self) -> None:
        """The batch is over: free the cache, and `release()` (the model's lock) once."""
        self.cache = self.logits = self.fed = None
        release, self.release = self.release, lambda: None
        release()

    # ----------------------------------------------------------------------------------------------------
    # inside
    def _feed(self) -> None:
        """Run the tokens picked last step, so the cache holds every row's tokens and `logits` is current."""
        import torch

        if self.fed is None:
            return
        ones = torch.ones((self.mask.shape[0], 1), dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=-1)
        self.logits = self.forward(self.fed[:, None], self.mask, self.positions[:, None], self.cache,
                                   self.adapters if self.mixed else None)
        self.positions = self.positions + 1
        self.fed = None

    def _merge(self, cache, mask) -> None:
        """Append `cache`'s rows to the live ones; the shorter side is padded on the left (zeros, masked
        out)."""
        import torch

        old, new = self.mask.shape[1], mask.shape[1]
        length = max(old, new)

        def left(t, n):  # [rows, heads, n, dim] -> [rows, heads, length, dim]
            return t if n == length else torch.cat([t.new_zeros(t.shape[:2] + (length - n, t.shape[3])), t],
                                                   dim=2)

        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([left(mine.keys, old), left(theirs.keys, new)])
            mine.values = torch.cat([left(mine.values, old), left(theirs.values, new)])
        pad = lambda m, n: m if n == length else torch.cat([m.new_zeros((m.shape[0], length - n)), m], dim=-1)  # noqa: E731
        self.mask = torch.cat([pad(self.mask, old), pad(mask, new)])

    def _trim(self) -> None:
        """Drop the leading columns no live row uses (left padding of rows that were dropped)."""
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]


def _shared_prefix(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least its last token (whose logits give the first
    answer)."""
    limit = min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def sampler(temperature: float, top_p: float, top_k: int | None):
    """Each row's next token from its logits: greedy at temperature 0, else `generate()`'s sampling order
    (temperature, then top-k, then top-p; top-k defaults to 50 there too)."""
    import torch

    def sample(logits):
        if temperature <= 0:
            return logits.argmax(dim=-1)
        scores = logits.float() / temperature
        k = 50 if top_k is None else top_k
        if 0 < k < scores.shape[-1]:
            kth = torch.topk(scores, k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p < 1.0:
            # ascending, as generate's TopPLogitsWarper
            ordered, order = scores.sort(dim=-1)
            tail = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
            tail[:, -1] = False                                     # the likeliest token always stays
            scores = scores.masked_fill(tail.scatter(1, order, tail), float("-inf"))
        return torch.multinomial(scores.softmax(dim=-1), 1)[:, 0]

    return sample
