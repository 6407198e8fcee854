"""The transformers engine: one copy of each base model in memory serves every side that shares it.

Versions whose adapters share a base and a PEFT type are loaded onto one PeftModel (`load_adapter`); the base side is
the same weights with the adapter layers switched off. Other adapters (another PEFT type, prompt learning) and full
fine-tunes get a model of their own.

Concurrency: `generate()` runs in a thread per request and calls the model's forward once per new token. A lock is
taken around each forward (not around the whole generate), and each forward first puts the adapter state the
calling request wants in place, so two conversations on one model interleave token by token and both panes stream
at once, without one request ever running on another's adapter.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.serving.base import Engine, ModelChoice, Settings, plain_messages
from mlflow_finetune_plugin.serving.choices import LocalModel, local_model

_BASE = "__base__"


@dataclass
class _Slot:
    """One model in memory, the adapters loaded on it and the lock every forward takes."""

    model: object                 # PeftModel or a plain PreTrainedModel
    base_key: tuple | None        # the base weights it holds (None: a full fine-tune's own weights)
    peft_type: str | None         # None for plain models
    prompt_learning: bool = False
    adapters: dict[str, str] = field(default_factory=dict)   # choice key -> adapter name
    lock: threading.Lock = field(default_factory=threading.Lock)
    state: str | None = None      # adapter name active now, _BASE when adapter layers are off
    wanted: threading.local = field(default_factory=threading.local)


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
        inner = slot.model.get_base_model() if slot.peft_type else slot.model

        def before(module, args, kwargs):
            slot.lock.acquire()
            try:
                self._apply_state(slot, getattr(slot.wanted, "name", ""))
            except BaseException:
                slot.lock.release()
                raise

        def after(module, args, kwargs, output):
            slot.lock.release()

        inner.register_forward_pre_hook(before, with_kwargs=True)
        inner.register_forward_hook(after, with_kwargs=True, always_call=True)
        self._slots.append(slot)
        return slot

    @staticmethod
    def _apply_state(slot: _Slot, name: str) -> None:
        """Put adapter `name` (or _BASE: adapters off) in place; called under the slot's lock."""
        if not slot.peft_type or slot.prompt_learning or not name or name == slot.state:
            return  # plain models (no adapter yet) have no state; prompt learning routes base calls past the adapter
        if name == _BASE:
            slot.model.base_model.disable_adapter_layers()
        else:
            if slot.state == _BASE or slot.state is None:
                slot.model.base_model.enable_adapter_layers()
            slot.model.set_adapter(name, inference_mode=True)
        slot.state = name

    # ---------------------------------------------------------------------------------------------- generation
    def stream(self, choice: ModelChoice, messages: list[dict], settings: Settings) -> Iterator[str]:
        """Stream the answer token by token (a TokenStreamer fed by generate() in a thread)."""
        settings = settings.checked(max_new_tokens_cap=None)  # ranges only: the playground applies its own cap
        slot, adapter, tokenizer = self._route(choice)
        if adapter is None:  # the base side: adapter layers off, checked at every forward (see _apply_state),
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
            slot.wanted.name = adapter
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
