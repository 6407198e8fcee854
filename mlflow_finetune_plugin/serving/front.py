"""The OpenAI-compatible front `mlflow-finetune serve` puts before the model server (`vllm serve`,
`transformers serve`), so both engines behave the same way to a client.

`transformers serve` lists the models of the hub cache rather than the one it serves (HTTP 500 where that
cache does not exist) and answers a request for another model with 400. The front answers `/v1/models` with
the served names, refuses unknown model names with 404 (as OpenAI does), and passes everything else through to
the server, which runs as a child on a loopback port in its own process group. The front's port opens only
once every served model has answered a one-token chat request, so a client never sees a server that is up but
still loading (`transformers serve` loads on the first request; vLLM takes tens of seconds to start). With a
`resolve` hook (vLLM), a request for a model not served yet may load it into the running server first. A stop
signal (SIGTERM, SIGINT, SIGHUP) to `serve` ends the front and then that whole group (vLLM's EngineCore
included); the child also gets SIGTERM from the kernel if `serve` dies without cleaning up.

The front routes by name (`Routes`): a model served by alias is also asked for as `NAME@ALIAS`, and when the
alias moves (`follow.py`) the route switches to the new version's server or adapter at once, while the
requests already forwarded finish where they started; `serve` stops the old server once none is left in
flight.

With `serve --trace EXPERIMENT`, each chat completion that passes is recorded as an MLflow trace
(`tracing.py`), its id sent back in the `x-mlflow-trace-id` header, and `POST /v1/feedback` logs a user's
verdict on it.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations (Request) at run
# time.
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from mlflow_finetune_plugin.runtime import claims, threads

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_MODEL_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding"}


def model_entry(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "mlflow-finetune"}


def not_found(model, served: list[str] | None = None) -> dict:
    """OpenAI's answer for a model it does not have (with the names it does have, when known)."""
    also = f" Served here: {', '.join(served)}." if served else ""
    return {"error": {"message": f"The model `{model}` does not exist on this server.{also}",
                      "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}


class Routes:
    """What the front serves: each served name's server (its loopback base URL and the name that server knows
    the model by), the names clients may also use (`NAME@champion` for whichever `NAME-vN` the alias names),
    and the requests each served name has in flight. Thread-safe: following the registry changes it while
    requests read it.

    A served name may have a rewrite, `rewrite(request body, its trace's span or None)` -> the body sent on: a
    registered prompt's (`add_prompt`), or what `rewrite_for(name)` gives, asked once per name (a version that
    retrieves: `retrieving.rewrite_for`), whether the name was served from the start, loaded later or
    followed."""

    def __init__(self, names: list[str], upstream: str, rewrite_for=None):
        self._routes: dict[str, tuple[str, str]] = {n: (upstream, n) for n in names}  # ordered as listed
        self._aliases: dict[str, str] = {}
        self._rewrites: dict[str, object] = {}  # served name -> its request's rewrite, or None
        # a prompt's served name -> (its model's, the prompt's URI)
        self._prompts: dict[str, tuple[str, str]] = {}
        self._rewrite_for = rewrite_for
        self._in_flight: dict[str, int] = {}
        self._changed = threading.Condition()
        self.default = upstream  # where requests that name no model go (/health, ...)

    def names(self) -> list[str]:
        with self._changed:
            return list(self._routes)

    def lookup(self, requested: str) -> tuple[str, str, str] | None:
        """(served name, upstream URL, the upstream's name for it) for a served name or an alias, else
        None."""
        with self._changed:
            served = self._aliases.get(requested, requested)
            route = self._routes.get(served)
            return (served, *route) if route else None

    def aliases(self) -> dict[str, str]:
        with self._changed:
            return dict(self._aliases)

    def add(self, name: str, upstream: str, upstream_name: str | None = None) -> None:
        with self._changed:
            self._routes[name] = (upstream, upstream_name or name)

    def add_prompt(self, name: str, model: str, rewrite, uri: str) -> None:
        """Serve `name` as served model `model` asked with a prompt: `rewrite(request)` gives the request it
        sends (`serve --prompt`: the registered prompt `uri` applied to the client's messages). Its answers
        say `name`."""
        with self._changed:
            self._routes[name] = self._routes[model]
            self._rewrites[name] = rewrite
            self._prompts[name] = (model, uri)

    def prompt_of(self, name: str) -> tuple[str, str] | None:
        """(the served name of the model that answers, the prompt's URI) for a prompt's served name, else
        None."""
        with self._changed:
            return self._prompts.get(name)

    def rewrite_of(self, name: str):
        with self._changed:
            if name in self._rewrites or self._rewrite_for is None:
                return self._rewrites.get(name)
        rewrite = self._rewrite_for(name)  # outside the lock: it may read the registry
        with self._changed:
            return self._rewrites.setdefault(name, rewrite)

    def point(self, alias: str, name: str) -> None:
        """Requests for `alias` go to served name `name` from now on."""
        with self._changed:
            self._aliases[alias] = name

    def switch(self, alias: str, old: str, new: str, upstream: str, upstream_name: str | None = None) -> None:
        """At once: serve `new` (on `upstream`), point `alias` at it and stop listing `old`. Requests already
        forwarded to `old` go on where they are."""
        with self._changed:
            old_upstream = self._routes.pop(old, (None,))[0]
            self._routes[new] = (upstream, upstream_name or new)
            self._aliases[alias] = new
            if self.default == old_upstream:
                self.default = upstream

    def begin(self, name: str) -> None:
        with self._changed:
            self._in_flight[name] = self._in_flight.get(name, 0) + 1

    def end(self, name: str) -> None:
        with self._changed:
            self._in_flight[name] -= 1
            self._changed.notify_all()

    def in_flight(self, name: str) -> int:
        with self._changed:
            return self._in_flight.get(name, 0)

    def wait_drained(self, name: str, timeout: float) -> bool:
        """Wait until no request for `name` is in flight (True), at most `timeout` seconds (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._in_flight.get(name), timeout=timeout)


def build_front(routes: Routes, resolve=None, tracer=None, start=None):
    """The front's ASGI app over `routes`; `resolve(name)` (optional) is the load request for a model not
    served yet, None when there is no such model; `start(name)` (optional, instead) starts a server for such a
    model and returns (its URL, its name for the model), or None (the fine-tuning API: versions trained after
    the server started); with a `tracer` (`serve --trace`), each chat completion is recorded as a trace
    (`tracing.py`) and `POST /v1/feedback` rates an answer."""
    import httpx
    from fastapi import FastAPI

    created = int(time.time())
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), trust_env=False)
    app = FastAPI(title="mlflow-finetune serve", docs_url=None, redoc_url=None, openapi_url=None)
    _add_listing(app, routes, created)
    _add_feedback(app, tracer)
    _add_forwarding(app, routes, client, tracer, _loader(routes, client, resolve, start))
    return app


def _add_listing(app, routes: Routes, created: int) -> None:
    """`/v1/models`: the served names, not the server's own list."""
    from fastapi.responses import JSONResponse

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_entry(n, created) for n in routes.names()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        if model not in routes.names():
            return JSONResponse(not_found(model, routes.names()), status_code=404)
        return model_entry(model, created)


def _loader(routes: Routes, client, resolve, start):
    """The coroutine that serves a model asked for by name before its first request: None once it is served,
    else the error response."""
    import asyncio

    from fastapi.responses import JSONResponse

    loading = asyncio.Lock()

    async def load(model: str):
        from mlflow_finetune_plugin.errors import FinetuneError

        async with loading:  # one load at a time: two first requests for a new version load it once
            if routes.lookup(model):
                return None
            try:
                if start is not None:
                    started = await asyncio.to_thread(start, model)
                    if started is None:
                        return JSONResponse(not_found(model, routes.names()), status_code=404)
                    routes.add(model, *started)
                    return None
                request = await asyncio.to_thread(resolve, model) if resolve else None
            except FinetuneError as e:
                return JSONResponse(_error(str(e), "invalid_request_error"), status_code=400)
            if request is None:
                return JSONResponse(not_found(model, routes.names()), status_code=404)
            answer = await client.post(routes.default + "/v1/load_lora_adapter", json=request)
            if answer.status_code != 200:
                return JSONResponse(_error(f"the server could not load {model}: {answer.text}",
                                           "server_error"), status_code=502)
            routes.add(model, routes.default)
            return None

    return load


def _add_feedback(app, tracer) -> None:
    """`POST /v1/feedback`: a rating of a traced answer (`serve --trace`)."""
    import asyncio

    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        if tracer is None:
            return JSONResponse(_error("this server records no traces, so it takes no feedback: start it "
                                       "with `mlflow-finetune serve ... --trace "
                                       "EXPERIMENT`", "invalid_request_error"),
                                status_code=404)
        try:
            body = await request.json()
        except ValueError:
            body = None
        status, answer = await asyncio.to_thread(tracer.answer_feedback, body)
        return JSONResponse(answer, status_code=status)


def _add_forwarding(app, routes: Routes, client, tracer, load) -> None:
    """Everything else passes through to the model server: a model request is routed by its name (loaded first
    where it is not served yet), renamed as the client asked for it, counted while in flight and traced."""
    import asyncio

    import httpx
    from fastapi import Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask

    from mlflow_finetune_plugin.serving.renaming import renamed as renamed_chunks
    from mlflow_finetune_plugin.serving.renaming import requested_model, with_model

    @app.api_route("/{path:path}", methods=["GET", "POST", "OPTIONS"])
    async def forward(path: str, request: Request):
        from mlflow_finetune_plugin.serving.tracing import TRACE_HEADER, TracedRequest

        body = await request.body()
        served, upstream, traced = None, routes.default, None
        if request.method == "POST" and "/" + path in _MODEL_ROUTES:
            model = requested_model(body)
            if model is not None:
                if routes.lookup(model) is None:
                    refused = await load(model)
                    if refused is not None:
                        return refused
                served, upstream, upstream_name = routes.lookup(model)
                if tracer is not None and path == "v1/chat/completions":
                    traced = await asyncio.to_thread(TracedRequest.begin, tracer, served, model, body,
                                                     routes.prompt_of(served))
                if (rewrite := await asyncio.to_thread(routes.rewrite_of, served)) is not None:
                    body = await asyncio.to_thread(rewrite, body, traced.span if traced else None)
                if upstream_name != model:  # an alias (`NAME@champion`): the server knows the version's name
                    body = with_model(body, upstream_name)
        # The server knows the model by another name (a prompt's base, a fine-tune without OpenAI's `ft:`):
        # the answer is given the served name, as the client asked for it.
        renamed = served if served and served != upstream_name else None
        # A traced or renamed answer is read as it passes: asked for uncompressed.
        dropped = _HOP_HEADERS | {"host"} | ({"accept-encoding"} if traced or renamed else set())
        headers = {k: v for k, v in request.headers.items() if k.lower() not in dropped}
        # Counted until the answer has been passed on whole: the server it came from is stopped only after
        # that.
        if served:
            routes.begin(served)
        try:
            upstream_request = client.build_request(request.method, f"{upstream}/{path}",
                                                    params=request.query_params, headers=headers,
                                                    content=body)
            response = await client.send(upstream_request, stream=True)
        except httpx.TransportError as e:
            if served:
                routes.end(served)
            if traced:
                await asyncio.to_thread(traced.end, f"the model server is not answering: {e}")
            return JSONResponse(_error(f"the model server is not answering: {e}", "server_error"),
                                status_code=503)

        async def finish():
            await response.aclose()
            if served:
                routes.end(served)
            if traced:
                await asyncio.to_thread(traced.end)

        answer_headers = {k: v for k, v in response.headers.items()
                          if k.lower() not in _HOP_HEADERS | {"date", "server"}}
        chunks = response.aiter_raw()
        if renamed:
            chunks = renamed_chunks(chunks, renamed,
                                    "text/event-stream" in response.headers.get("content-type", ""))
        if traced:
            answer_headers[TRACE_HEADER] = traced.trace_id
            chunks = traced.watch(chunks, response.status_code)
        return StreamingResponse(chunks, status_code=response.status_code, headers=answer_headers,
                                 background=BackgroundTask(finish))


def _error(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind}}


def loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Child:
    """A model server behind the front: its process (a process group of its own), loopback URL and model
    names."""

    process: subprocess.Popen
    url: str
    names: list[str]
    serving: bool = False  # it has answered and requests go to it: from then on, its death ends `serve`
    retired: bool = False  # stopped on purpose (replaced by a newer version), not a failure


class Fleet:
    """The model servers behind the front: started, one that dies unasked ends `serve`, retired ones
    stopped."""

    def __init__(self):
        self.children: list[Child] = []
        self._lock = threading.Lock()
        self.stopping = threading.Event()

    def start(self, argv: list[str], port: int, names: list[str], cwd: str | None = None,
              env: dict | None = None) -> Child:
        # its share of the cores beside the project's other processes; it never re-counts: it waits passively
        chosen = threads.plan(None, "serve engine", fixed=True)
        if chosen.busy_note:
            print(chosen.busy_note, file=sys.stderr, flush=True)
        process = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **threads.child_env(chosen),
                                                       **(env or {})}, preexec_fn=_child_setup)
        claims.claim(chosen.intra, "serve engine", pid=process.pid)
        child = Child(process, f"http://127.0.0.1:{port}", list(names))
        with self._lock:
            self.children.append(child)
        return child

    def server_of(self, name: str) -> Child | None:
        """The live server that serves `name`."""
        with self._lock:
            return next((c for c in self.children if not c.retired and name in c.names), None)

    def retire(self, child: Child) -> None:
        """Stop `child` on purpose (its process group, as at the end)."""
        child.retired = True
        stop_group(child.process)

    def failed(self) -> Child | None:
        """A server that was serving and exited without being asked to (one that fails to start is its
        starter's business: a new version that does not start leaves the old one serving)."""
        with self._lock:
            return next((c for c in self.children if c.serving and not c.retired
                         and c.process.poll() is not None), None)

    def stop_all(self) -> None:
        self.stopping.set()
        for child in list(self.children):
            stop_group(child.process)


def run_front(fleet: Fleet, routes: Routes, host: str, port: int, resolve=None, on_ready=None, echo=print,
              tracer=None) -> int:
    """Wait until every model of the fleet's first server answers, then open the front on host:port and call
    `on_ready()`; return when a stop signal arrives or a server dies, with every server stopped. Returns the
    exit code for `serve`."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(build_front(routes, resolve, tracer), host=host, port=port,
                                           log_level="warning"))
    stopped_by: list[int] = []

    # uvicorn handles SIGINT/SIGTERM itself while it serves, then hands them back here
    def stop(signum, frame):
        stopped_by.append(signum)
        fleet.stopping.set()
        server.handle_exit(signum, frame)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    first = fleet.children[0]
    try:
        started = time.monotonic()
        if not wait_until_answering(first, fleet.stopping.is_set):
            return 0 if stopped_by else (first.process.returncode or 1)
        first.serving = True
        echo(f"Ready after {time.monotonic() - started:.0f} s: http://{host}:{port}/v1 answers for "
             f"{', '.join(first.names)}")
        sys.stdout.flush()
        threading.Thread(target=_exit_when_a_server_dies, args=(fleet, server), daemon=True).start()
        if on_ready:
            on_ready()
        server.run()
    finally:
        fleet.stop_all()
        if tracer is not None:
            tracer.flush()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped_by:
        return 0
    dead = fleet.failed()
    return dead.process.returncode if dead and dead.process.returncode else 1


def wait_until_answering(child: Child, stopped=lambda: False) -> bool:
    """Poll until each model of `child` answers a one-token chat request (True), or it exits or `stopped()`
    first (False). 4xx answers count as answering: the server is up and says why."""
    import httpx

    pending = list(child.names)
    with httpx.Client(base_url=child.url, timeout=httpx.Timeout(None, connect=2.0),
                      trust_env=False) as client:
        while pending:
            if child.process.poll() is not None or stopped():
                return False
            try:
                answer = client.post("/v1/chat/completions", json={
                    "model": pending[0], "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]})
                if answer.status_code < 500:
                    pending.pop(0)
                    continue
            except httpx.TransportError:
                pass
            time.sleep(0.5)  # polling interval while the server starts; the loop checks the real condition
    return True


def _exit_when_a_server_dies(fleet: Fleet, server) -> None:
    while not fleet.stopping.wait(0.5):  # polling interval; the loop checks the real condition
        if fleet.failed():
            server.should_exit = True
            return


def _child_setup() -> None:
    """In the child, before exec: its own process group (stopped as one), and SIGTERM when its parent dies."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def stop_group(child: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM to the child's process group, SIGKILL to what is left after `timeout` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            pass
        try:
            child.wait(timeout=timeout)
            _wait_group_gone(child.pid, timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_group_gone(pgid: int, timeout: float) -> None:
    """Wait for the rest of the group (the server's own children) to go, then SIGKILL any left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)  # polling interval; the loop checks the real condition
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
