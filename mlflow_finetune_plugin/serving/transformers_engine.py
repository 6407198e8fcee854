"""The transformers engine: one copy of each base model in memory serves every side that shares it.

Versions whose adapters share a base and a PEFT type are loaded onto one PeftModel (`load_adapter`); the base
side is the same weights with the adapter layers switched off. Other adapters (another PEFT type, prompt
learning) and full fine-tunes get a model of their own.

Concurrency: requests are batched (`batching.py`): each model in memory has a scheduler thread that runs the
requests waiting for it together. Where the model allows it (`stepping.py`), batching is continuous: the
engine steps the batch token by token, rows leave when they end and new requests join. Otherwise (prompt
learning, caches other than a plain growing one) a batch is one left-padded `generate()`. On a LoRA model the
base side and every version share one batch (PEFT's mixed-adapter batches, `adapter_names`); on other models a
batch holds one adapter state. A model's lock is held for a whole batch; loading an adapter stops new rows
from joining, waits for the batch to end, and only then changes the modules.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.models.chat_format import prompt_ids, stop_ids
from mlflow_finetune_plugin.models.image_inputs import (
    has_image_parts,
    prompt_inputs,
    read_image,
    with_placeholders,
)
from mlflow_finetune_plugin.models.peft_targets import keep_module_targets, load_adapter
from mlflow_finetune_plugin.models.vision import processor_of
from mlflow_finetune_plugin.serving.base import Engine, ModelChoice, Settings, plain_messages
from mlflow_finetune_plugin.serving.batching import Batcher, Request, TokenStreamer, row_hook
from mlflow_finetune_plugin.serving.choices import LocalModel, local_model
from mlflow_finetune_plugin.serving.stepping import Stepper, sampler, steppable

_BASE = "__base__"   # PEFT's name for a row that runs without adapters
_MIXED = "__mixed__"  # adapter layers on, each row names its adapter


@dataclass(eq=False)
class _Slot:
    """One model in memory, the adapters loaded on it, and the scheduler that runs its batches."""

    model: object                 # PeftModel or a plain PreTrainedModel
    base_key: tuple | None        # the base weights it holds (None: a full fine-tune's own weights)
    peft_type: str | None         # None for plain models
    prompt_learning: bool = False
    adapters: dict[str, str] = field(default_factory=dict)   # choice key -> adapter name
    # an adapter uses DoRA, or LoRA on parameters (target_parameters, a mixture's
    dora: bool = False
                                  # experts): PEFT's mixed-adapter batches refuse both
    # held by a running batch, and while loading
    lock: threading.Lock = field(default_factory=threading.Lock)
    loading: threading.Event = field(default_factory=threading.Event)  # set while a loader waits for the lock
    steppable: bool = False       # continuous batching works on this model (stepping.steppable)
    # adapter name active now, _BASE when adapter layers are off, _MIXED, None: unknown
    state: str | None = None
    batcher: Batcher | None = None

    def mixes_adapters(self) -> bool:
        """Whether one batch may hold the base side and several adapters (`adapter_names`): LoRA without DoRA
        and without LoRA on parameters (PEFT's ParamWrapper)."""
        return self.peft_type == "LORA" and not self.dora

    def group(self, request: Request) -> Hashable:
        """Which requests may share a batch: one adapter state unless the model mixes them, and the same
        sampling (a stepped batch ends each row at its own max_new_tokens and end-of-turn ids; `generate()`
        needs them shared too)."""
        # images: a batch of its own (pixel inputs are not padded together here)
        if request.inputs is not None:
            return "images", id(request)
        state = "" if self.peft_type is None or self.mixes_adapters() else request.adapter
        settings = request.settings
        if self.steppable and settings.num_beams == 1:
            return settings.temperature, settings.top_p, state
        return settings, request.eos, state

    @contextmanager
    def changing(self):
        """Hold the lock to change the model: a running batch takes no more rows, drains, and lets go of
        it."""
        self.loading.set()
        try:
            with self.lock:
                yield
        finally:
            self.loading.clear()

    def put_in_place(self, first: Request) -> bool:
        """Set the adapter state for a batch led by `first` (under the lock): True when the rows name their
        adapters (`adapter_names`, a mixed LoRA batch), False when the whole batch runs `first`'s state."""
        # A prompt with images is a batch of its own, run in its adapter's state: PEFT's per-row
        # `adapter_names` would meet a vision tower's LoRA (lora.vision) with the image's tiles as rows
        # ("Length of `adapter_names` should be the same as the number of inputs, but got 1 and 5").
        mixed = bool(self.peft_type) and self.mixes_adapters() and first.inputs is None
        self.switch_to(_MIXED if mixed else first.adapter)
        return mixed

    def switch_to(self, name: str) -> None:
        """Put adapter `name` (or _BASE: adapters off, _MIXED: on, chosen per row) in place; under the
        lock."""
        if not self.peft_type or self.prompt_learning or not name or name == self.state:
            # plain models (no adapter yet) have no state; prompt learning routes base calls past the adapter
            return
        if name == _BASE:
            self.model.base_model.disable_adapter_layers()
        else:
            if self.state == _BASE or self.state is None:
                self.model.base_model.enable_adapter_layers()
            if name != _MIXED:
                self.model.set_adapter(name, inference_mode=True)
        self.state = name


class TransformersEngine(Engine):
    """Serves registry versions with transformers + PEFT on CPU or one GPU."""

    name = "transformers"
    takes_images = True  # a vision-language model's processor reads the image parts (`_prompt`)

    def __init__(self, device: str | None = None, concurrency: int = 16, max_batch: int = 32):
        import torch

        # Resolved here, once: transformers' lazy module can fail ("cannot import name ...") when two
        # generation threads import the same name from it at the same moment.
        from transformers import (  # noqa: F401
            AutoModelForCausalLM,
            AutoTokenizer,
            StoppingCriteria,
            StoppingCriteriaList,
        )

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # Requests at once: with batching, 16 comparisons (32 answers) fit one batch of `max_batch` rows.
        self.concurrency = concurrency
        self.max_batch = max_batch
        self._slots: list[_Slot] = []
        # choice key -> (slot, adapter name, tokenizer)
        self._routes: dict[str, tuple[_Slot, str, object]] = {}
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
        # The logged tokenizer carries the chat template the model was trained with; the base side uses it
        # too, so both sides see the same prompt.
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
            # the plain base is loaded already: put the adapter on it, no second copy
            if slot.peft_type is None:
                self._wrap(slot, local, cfg, name)
                return slot, name, tokenizer
            if (slot.peft_type == cfg.get("peft_type") and not slot.prompt_learning
                    and not _is_prompt_learning(cfg)):
                with slot.changing():  # no batch may run while modules are being added
                    keep_module_targets()  # a mixture of experts' adapter as saved (models/peft_targets.py)
                    slot.model.load_adapter(str(local.adapter_dir), adapter_name=name)
                    slot.model.eval()
                    slot.dora = slot.dora or _unmixable(cfg)
                    slot.state = None  # unknown: the next batch puts its adapter state in place in full
                slot.adapters[choice.key] = name
                return slot, name, tokenizer
        slot = self._new_slot(local, adapter=True)
        return slot, slot.adapters[choice.key], tokenizer

    def _tokenizer(self, folder):
        """One tokenizer per distinct set of tokenizer files: a version's two sides, and versions trained from
        one base with one chat template, share it (a fast tokenizer of a 49k vocabulary is ~12 MiB)."""
        import hashlib

        from mlflow_finetune_plugin.logged_model import saved_tokenizer

        digest = hashlib.sha256()
        for f in sorted(p for p in Path(folder).iterdir() if p.is_file()):
            digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        key = digest.hexdigest()
        # a vision-language model's comes with its processor (models/vision.py)
        if key not in self._tokenizers:
            self._tokenizers[key] = saved_tokenizer(folder)
        return self._tokenizers[key]

    def _wrap(self, slot: _Slot, local: LocalModel, cfg: dict, name: str) -> None:
        """Turn a plain base slot into a PeftModel slot holding `local`'s adapter (same weights, in place)."""
        with slot.changing():
            slot.model = load_adapter(slot.model, local.adapter_dir, adapter_name=name)
            slot.model.to(self.device).eval()
            slot.peft_type = cfg.get("peft_type")
            slot.prompt_learning = _is_prompt_learning(cfg)
            slot.dora = _unmixable(cfg)
            slot.state = None
            slot.steppable = not slot.prompt_learning and steppable(slot.model)
        slot.adapters[local.choice.key] = name

    def _base_slot(self, local: LocalModel) -> _Slot:
        """A model holding `local`'s base weights: any adapter slot on that base (adapters off), else the
        base."""
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
        slot = _Slot(loaded.model, local.base_key(), cfg.get("peft_type"), _is_prompt_learning(cfg),
                     dora=_unmixable(cfg))
        slot.adapters[local.choice.key] = loaded.model.active_adapter
        slot.state = loaded.model.active_adapter
        return self._install(slot)

    def _install(self, slot: _Slot) -> _Slot:
        slot.steppable = not slot.prompt_learning and steppable(slot.model)
        slot.batcher = Batcher(f"{len(self._slots)}", lambda batch: self._run(slot, batch), slot.group,
                               self.max_batch, start=lambda batch: self._start(slot, batch),
                               admit=lambda: not slot.loading.is_set())
        self._slots.append(slot)
        return slot

    # ----------------------------------------------------------------------------------------------
    # generation
    def stream(self, choice: ModelChoice, messages: list[dict], settings: Settings) -> Iterator[str]:
        """Stream the answer token by token: the request joins the next batch of its model (see
        batching.py)."""
        # ranges only: the playground applies its own cap
        settings = settings.checked(max_new_tokens_cap=None)
        slot, adapter, tokenizer = self._route(choice)
        # the base side: adapter layers off for this row (another request may put an adapter
        if adapter is None:
            adapter = _BASE  # on this slot meanwhile, so the slot is asked per batch, not now)
        prompt, inputs = _prompt(tokenizer, messages)
        limit = _context_limit(slot.model)
        if limit and len(prompt) + settings.max_new_tokens > limit:
            raise FinetuneError(
                f"the conversation is {len(prompt)} tokens and {settings.max_new_tokens} new tokens "
                f"would exceed the model's context of {limit}; clear the chat or lower max new tokens")
        eos = _eos_ids(tokenizer, slot.model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
        request = Request(prompt, adapter, settings, frozenset(eos), pad,
                          TokenStreamer(tokenizer, timeout=600, answer=True), inputs=inputs)
        slot.batcher.submit(request)
        try:
            yield from request.streamer
        except FinetuneError as e:
            raise FinetuneError(f"{choice.key}: {e}") from None
        finally:
            request.cancel()  # the reader went away (or the answer is complete): its row stops

    def _start(self, slot: _Slot, batch: list[Request]) -> Stepper | None:
        """A Stepper for `batch` (continuous batching), holding the slot's lock until it closes; None where
        the model needs `generate()` (prompt learning adds virtual tokens there; see stepping.steppable) or
        the batch searches beams."""
        if not slot.steppable or batch[0].settings.num_beams > 1 or batch[0].inputs is not None:
            return None
        import torch

        first = batch[0]
        slot.lock.acquire()
        try:
            mixed = slot.put_in_place(first)
            model, device = slot.model, _device_of(slot.model)

            @torch.inference_mode()
            def forward(ids, mask, positions, cache, adapters):
                extra = {"adapter_names": adapters} if adapters is not None else {}
                out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True, logits_to_keep=1, **extra)
                return out.logits[:, -1]

            settings = first.settings
            sample = sampler(settings.temperature, settings.top_p, getattr(model.generation_config, "top_k",
                                                                           None))
            return Stepper(forward, sample, model.config, first.pad_id, device, mixed,
                           release=slot.lock.release)
        except BaseException:
            slot.lock.release()
            raise

    def _run(self, slot: _Slot, batch: list[Request]) -> None:
        """Generate `batch` (one group, see _Slot.group) as one left-padded `generate()`, in the slot's
        thread.

        Greedy and sampled rows stream token by token (`row_hook`). Beam search (`num_beams` > 1, as
        models.generation.generate scores it: early stopping, no sampling) knows each row's answer only when
        the search ends, so each answer comes whole."""
        import torch
        from transformers import StoppingCriteriaList

        first = batch[0]
        settings = first.settings
        width = max(len(r.prompt) for r in batch)
        # Left padding, masked: each row's positions and attention are those of its prompt alone.
        ids = torch.tensor([[r.pad_id] * (width - len(r.prompt)) + r.prompt for r in batch])
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch])
        sampling = ({"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
                    if settings.temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None})
        beams = settings.num_beams > 1
        # the stopping criterion sees batch x beams rows: no streaming hook, the answers come at the end
        if beams:
            sampling.update(num_beams=settings.num_beams, early_stopping=True)
        hooks = [] if beams else [row_hook(batch)]
        with slot.lock:
            target, extra = slot.model, {}
            if slot.put_in_place(first):
                extra["adapter_names"] = [r.adapter for r in batch]
            # prompt learning adds its virtual tokens in
            elif slot.prompt_learning and first.adapter == _BASE:
                # PeftModel.generate: the base calls past it
                target = slot.model.get_base_model()
            device = _device_of(target)
            if first.inputs is not None:  # a prompt with images, alone in its batch
                extra.update({k: v.to(device) for k, v in first.inputs.items()})
            out = target.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                  max_new_tokens=settings.max_new_tokens,
                                  eos_token_id=sorted(first.eos) or None, pad_token_id=first.pad_id,
                                  stopping_criteria=StoppingCriteriaList(hooks), **sampling, **extra)
        if beams:
            for request, row in zip(batch, out[:, width:].tolist()):
                # each answer's tokens, as a streamed row would take them (ends at end of turn)
                for token in row:
                    request.take(token)
                    if request.done:
                        break

    def close(self) -> None:
        """End every request (waiting ones with an error) and drop every loaded model."""
        for slot in self._slots:
            slot.batcher.close()
        self._routes.clear()
        self._slots.clear()
        self._tokenizers.clear()


def _prompt(tokenizer, messages: list[dict]) -> tuple[list[int], dict | None]:
    """The prompt's token ids, and for a vision-language model given images, the processor's other inputs (the
    images read from the messages' image parts: data URLs, paths, OpenAI `image_url` parts)."""
    processor = processor_of(tokenizer)
    if processor is None or not has_image_parts(messages):
        return prompt_ids(tokenizer, plain_messages(messages)), None
    placed, refs = with_placeholders(plain_messages(messages, keep_images=True))
    enc = prompt_inputs(processor, tokenizer, [placed], [[read_image(ref) for ref in refs]])
    return enc["input_ids"][0].tolist(), {k: v for k, v in enc.items() if k not in ("input_ids",
                                                                                    "attention_mask")}


def _adapter_name(choice: ModelChoice) -> str:
    return f"{choice.name}-v{choice.version}".replace(".", "_")


def _is_prompt_learning(adapter_cfg: dict) -> bool:
    return adapter_cfg.get("peft_type") in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING",
                                            "MULTITASK_PROMPT_TUNING", "CPT")


def _eos_ids(tokenizer, model) -> list[int]:
    """Every end-of-turn id the tokenizer, the generation config and the chat template name
    (`chat_format`)."""
    return stop_ids(tokenizer, getattr(model, "generation_config", None))


def _context_limit(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def _device_of(model):
    return next(model.parameters()).device


def _unmixable(adapter_config: dict) -> bool:
    """An adapter PEFT cannot mix with others in one batch: DoRA, or LoRA on parameters
    (`target_parameters`)."""
    return bool(adapter_config.get("use_dora")) or bool(adapter_config.get("target_parameters"))
