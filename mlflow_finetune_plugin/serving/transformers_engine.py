"""The transformers engine: one copy of each base model in memory serves every side that shares it.

Versions whose adapters share a base and a PEFT type are loaded onto one PeftModel (`load_adapter`); the base side is
the same weights with the adapter layers switched off. Other adapters (another PEFT type, prompt learning) and full
fine-tunes get a model of their own.

Concurrency: `generate()` runs in a thread per request and calls the model's forward once per new token. Each model
in memory has a `ForwardLock`, held for one forward at a time (not for a whole generate), and each forward first puts
the adapter state the calling request wants in place, so two conversations on one model interleave token by token
and both panes stream at once, without one request ever running on another's adapter.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.serving.base import Engine, ModelChoice, Settings, plain_messages
from mlflow_finetune_plugin.serving.choices import LocalModel, local_model

_BASE = "__base__"


class ForwardLock:
    """One forward pass at a time on a model that several requests share, each on the adapter state it asked for.

    Why per forward: `generate()` runs in a thread per request and calls forward once per new token. A lock around
    the whole generate would make the second pane wait for the first answer to end; no lock would let a request's
    forward run on the adapter another request has just switched on. So `install` hooks a module's forward: a
    pre-hook takes the lock and then switches the model to the adapter the calling thread `want`s, a post-hook
    releases it. Two conversations interleave token by token, each forward on its own adapter.

    Releasing on errors, exactly once: the post-hook is registered with `always_call=True`, and torch runs such hooks
    when the pre-hook or the forward raises an Exception, so those release there. torch does not run them for a
    BaseException that is not an Exception (KeyboardInterrupt), so a switch interrupted that way releases in the
    pre-hook itself. Code that changes the model's
    modules (loading an adapter) holds the lock as a context manager (`with lock:`), so no forward runs halfway
    through the change.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._wanted = threading.local()   # per generating thread: the adapter state its forwards run with

    def want(self, name: str) -> None:
        """The adapter state (an adapter name, or _BASE) the calling thread's forwards run with."""
        self._wanted.name = name

    def install(self, module, switch: Callable[[str], None]) -> None:
        """Hook `module`'s forward: take the lock, `switch` to the calling thread's wanted state ("" when it wants
        none), run the forward, release."""

        def before(module, args, kwargs):
            self._lock.acquire()
            try:
                switch(getattr(self._wanted, "name", ""))
            except Exception:
                raise  # torch runs `after` for it: releasing here too would free another thread's hold
            except BaseException:
                self._lock.release()
                raise

        def after(module, args, kwargs, output):
            self._lock.release()

        module.register_forward_pre_hook(before, with_kwargs=True)
        module.register_forward_hook(after, with_kwargs=True, always_call=True)

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


@dataclass
class _Slot:
    """One model in memory, the adapters loaded on it and the lock every forward takes."""

    model: object                 # PeftModel or a plain PreTrainedModel
    base_key: tuple | None        # the base weights it holds (None: a full fine-tune's own weights)
    peft_type: str | None         # None for plain models
    prompt_learning: bool = False
    adapters: dict[str, str] = field(default_factory=dict)   # choice key -> adapter name
    lock: ForwardLock = field(default_factory=ForwardLock)
    state: str | None = None      # adapter name active now, _BASE when adapter layers are off

    def switch_to(self, name: str) -> None:
        """Put adapter `name` (or _BASE: adapters off) in place; called under the slot's lock."""
        if not self.peft_type or self.prompt_learning or not name or name == self.state:
            return  # plain models (no adapter yet) have no state; prompt learning routes base calls past the adapter
        if name == _BASE:
            self.model.base_model.disable_adapter_layers()
        else:
            if self.state == _BASE or self.state is None:
                self.model.base_model.enable_adapter_layers()
            self.model.set_adapter(name, inference_mode=True)
        self.state = name


class TransformersEngine(Engine):
    """Serves registry versions with transformers + PEFT on CPU or one GPU."""

    name = "transformers"

    def __init__(self, device: str | None = None, concurrency: int = 4):
        import torch

        # Resolved here, once: transformers' lazy module can fail ("cannot import name ...") when two generation
        # threads import the same name from it at the same moment.
        from transformers import (  # noqa: F401
            AutoModelForCausalLM,
            AutoTokenizer,
            StoppingCriteria,
            StoppingCriteriaList,
        )

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.concurrency = concurrency
        self._slots: list[_Slot] = []
        self._routes: dict[str, tuple[_Slot, str, object]] = {}   # choice key -> (slot, adapter name, tokenizer)
        self._tokenizers: dict[str, object] = {}                    # tokenizer files' digest -> tokenizer
        self._load_lock = threading.Lock()

    # ----------------------------------------------------------------------------------------------- loading
    def prepare(self, choice: ModelChoice) -> None:
        """Load the model (and adapter) `choice` needs; cheap when already loaded."""
        self._route(choice)

    def _route(self, choice: ModelChoice):
        with self._load_lock:
            if choice.key not in self._routes:
                self._routes[choice.key] = self._load(choice)
            return self._routes[choice.key]

    def _load(self, choice: ModelChoice):
        local = local_model(choice)
        # The logged tokenizer carries the chat template the model was trained with; the base side uses it too,
        # so both sides see the same prompt.
        tokenizer = self._tokenizer(local.tokenizer_dir)
        if choice.base:
            return self._base_slot(local), None, tokenizer  # adapters off: decided per request (see stream)
        if not local.is_adapter:
            return self._new_slot(local, adapter=False), "", tokenizer
        cfg = local.adapter_config()
        name = _adapter_name(choice)
        for slot in self._slots:
            if slot.base_key != local.base_key():
                continue
            if slot.peft_type is None:  # the plain base is loaded already: put the adapter on it, no second copy
                self._wrap(slot, local, cfg, name)
                return slot, name, tokenizer
            if (slot.peft_type == cfg.get("peft_type") and not slot.prompt_learning
                    and not _is_prompt_learning(cfg)):
                with slot.lock:  # no forward may run while modules are being added
                    slot.model.load_adapter(str(local.adapter_dir), adapter_name=name)
                    slot.model.eval()
                    slot.state = None  # unknown: the next forward puts its adapter state in place in full
                slot.adapters[choice.key] = name
                return slot, name, tokenizer
        slot = self._new_slot(local, adapter=True)
        return slot, slot.adapters[choice.key], tokenizer

    def _tokenizer(self, folder):
        """One tokenizer per distinct set of tokenizer files: a version's two sides, and versions trained from one
        base with one chat template, share it (a fast tokenizer of a 49k vocabulary is ~12 MiB)."""
        import hashlib

        from transformers import AutoTokenizer

        digest = hashlib.sha256()
        for f in sorted(p for p in Path(folder).iterdir() if p.is_file()):
            digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        key = digest.hexdigest()
        if key not in self._tokenizers:
            self._tokenizers[key] = AutoTokenizer.from_pretrained(folder)
        return self._tokenizers[key]

    def _wrap(self, slot: _Slot, local: LocalModel, cfg: dict, name: str) -> None:
        """Turn a plain base slot into a PeftModel slot holding `local`'s adapter (same weights, in place)."""
        from peft import PeftModel

        with slot.lock:
            slot.model = PeftModel.from_pretrained(slot.model, str(local.adapter_dir), adapter_name=name)
            slot.model.to(self.device).eval()
            slot.peft_type = cfg.get("peft_type")
            slot.prompt_learning = _is_prompt_learning(cfg)
            slot.state = None
        slot.adapters[local.choice.key] = name

    def _base_slot(self, local: LocalModel) -> _Slot:
        """A model holding `local`'s base weights: any adapter slot on that base (adapters off), else the base."""
        if local.is_adapter:
            for slot in self._slots:
                if slot.base_key == local.base_key():
                    return slot
        for slot in self._slots:
            if slot.base_key == local.base_key() and slot.peft_type is None:
                return slot
        import torch

        from mlflow_finetune_plugin.logged_model import load_logged_base

        model = load_logged_base(local.config, torch.float32 if self.device == "cpu" else "auto")
        slot = _Slot(model.to(self.device).eval(), local.base_key(), None)
        return self._install(slot)

    def _new_slot(self, local: LocalModel, adapter: bool) -> _Slot:
        from mlflow_finetune_plugin.logged_model import load_logged_model

        loaded = load_logged_model(local.path, device=self.device)
        if not adapter:
            return self._install(_Slot(loaded.model, None, None))
        cfg = local.adapter_config()
        slot = _Slot(loaded.model, local.base_key(), cfg.get("peft_type"), _is_prompt_learning(cfg))
        slot.adapters[local.choice.key] = loaded.model.active_adapter
        slot.state = loaded.model.active_adapter
        return self._install(slot)

    def _install(self, slot: _Slot) -> _Slot:
        # On the inner model (the base weights): every path runs its forward, and a PeftModel wrapped around it
        # later (`_wrap`) keeps calling it, so the hooks stay in place when an adapter is added.
        inner = slot.model.get_base_model() if slot.peft_type else slot.model
        slot.lock.install(inner, slot.switch_to)
        self._slots.append(slot)
        return slot

    # ---------------------------------------------------------------------------------------------- generation
    def stream(self, choice: ModelChoice, messages: list[dict], settings: Settings) -> Iterator[str]:
        """Stream the answer token by token (a TokenStreamer fed by generate() in a thread)."""
        settings = settings.checked(max_new_tokens_cap=None)  # ranges only: the playground applies its own cap
        slot, adapter, tokenizer = self._route(choice)
        if adapter is None:  # the base side: adapter layers off, checked at every forward (see _Slot.switch_to),
            adapter = _BASE  # since another request may put an adapter on this slot while this one runs
        enc = tokenizer.apply_chat_template(plain_messages(messages), add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        limit = _context_limit(slot.model)
        n_prompt = int(enc["input_ids"].shape[1])
        if limit and n_prompt + settings.max_new_tokens > limit:
            raise FinetuneError(f"the conversation is {n_prompt} tokens and {settings.max_new_tokens} new tokens "
                                f"would exceed the model's context of {limit}; clear the chat or lower max new tokens")
        device = _device_of(slot.model)
        enc = {k: v.to(device) for k, v in enc.items()}
        streamer = TokenStreamer(tokenizer, timeout=600)
        eos = _eos_ids(tokenizer, slot.model)
        sampling = ({"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
                    if settings.temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None})
        # Prompt learning puts its virtual tokens in through PeftModel.generate: the base side calls past it.
        target = slot.model.get_base_model() if (slot.prompt_learning and adapter == _BASE) else slot.model
        errors: list[BaseException] = []
        stop = threading.Event()  # set when the consumer goes away (client closed the page): stop generating

        def run():
            slot.lock.want(adapter)
            try:
                target.generate(**enc, streamer=streamer, max_new_tokens=settings.max_new_tokens,
                                eos_token_id=eos or None, pad_token_id=tokenizer.pad_token_id,
                                stopping_criteria=_stopping(stop), **sampling)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer thread below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True, name=f"generate-{choice.key}")
        thread.start()
        try:
            yield from streamer
        finally:
            stop.set()
            thread.join()
        if errors:
            raise FinetuneError(f"{choice.key}: generation failed: {type(errors[0]).__name__}: {errors[0]}")

    def close(self) -> None:
        """Drop every loaded model."""
        self._routes.clear()
        self._slots.clear()
        self._tokenizers.clear()


class TokenStreamer:
    """The streamer `generate()` feeds: each new token's text is handed out as soon as it is whole characters.

    transformers' TextIteratorStreamer holds text back to the last space, so a piece waits for its word to end and
    the first one came a word (several tokens) late. This one holds back only an incomplete UTF-8 sequence (a
    byte-level token that decodes to U+FFFD until its next byte comes). Each piece is what decoding the whole answer
    again adds to the text already sent, so the pieces join to `tokenizer.decode(answer, skip_special_tokens=True)`
    wherever decoding more tokens only appends text (byte-level BPE, the built-in models' tokenizers).
    """

    def __init__(self, tokenizer, timeout: float | None = None):
        self.tokenizer, self.timeout = tokenizer, timeout
        self.ids: list[int] = []
        self.sent = 0              # characters of the decoded answer handed out so far
        self.prompt_skipped = False
        self.pieces: queue.Queue = queue.Queue()

    def put(self, value) -> None:
        if not self.prompt_skipped:  # generate() puts the prompt first
            self.prompt_skipped = True
            return
        self.ids.extend(value.reshape(-1).tolist())  # batch of one
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.sent and not text.endswith("\ufffd"):
            self.pieces.put(text[self.sent:], timeout=self.timeout)
            self.sent = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.sent:
            self.pieces.put(text[self.sent:], timeout=self.timeout)
        self.pieces.put(None, timeout=self.timeout)

    def __iter__(self) -> Iterator[str]:
        while (piece := self.pieces.get(timeout=self.timeout)) is not None:
            yield piece


def _adapter_name(choice: ModelChoice) -> str:
    return f"{choice.name}-v{choice.version}".replace(".", "_")


def _is_prompt_learning(adapter_cfg: dict) -> bool:
    return adapter_cfg.get("peft_type") in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING",
                                            "CPT")


def _eos_ids(tokenizer, model) -> list[int]:
    """Every end-of-turn id the tokenizer and the generation config name (either may be a list)."""
    ids = []
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for t in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(t, int) and t not in ids:
                ids.append(t)
    return ids


def _stopping(event: threading.Event):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Stop()])


def _context_limit(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def _device_of(model):
    return next(model.parameters()).device
