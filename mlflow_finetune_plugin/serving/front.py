"""The OpenAI-compatible front `mlflow-finetune serve` puts before the model server (`vllm serve`, `transformers
serve`), so both engines behave the same way to a client.

`transformers serve` lists the models of the hub cache rather than the one it serves (HTTP 500 where that cache does
not exist) and answers a request for another model with 400. The front answers `/v1/models` with the served names,
refuses unknown model names with 404 (as OpenAI does), and passes everything else through to the server, which runs
as a child on a loopback port in its own process group. The front's port opens only once every served model has
answered a one-token chat request, so a client never sees a server that is up but still loading (`transformers
serve` loads on the first request; vLLM takes tens of seconds to start). With a `resolve` hook (vLLM), a request for
a model not served yet may load it into the running server first. A stop signal (SIGTERM, SIGINT, SIGHUP) to `serve`
ends the front and then that whole group (vLLM's EngineCore included); the child also gets SIGTERM from the kernel if
`serve` dies without cleaning up.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations (Request) at run time.
import os
import signal
import socket
import subprocess
import sys
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_MODEL_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding"}


def model_entry(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "mlflow-finetune"}


def not_found(model) -> dict:
    """OpenAI's answer for a model it does not have."""
    return {"error": {"message": f"The model `{model}` does not exist on this server.",
                      "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}


def build_front(names: list[str], upstream: str, resolve=None):
    """The front's ASGI app: `names` are the models served (a list it appends to), `upstream` the server's base URL,
    `resolve(name)` (optional) the load request for a model not served yet, None when there is no such model."""
    import asyncio

    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask

    created = int(time.time())
    client = httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(None, connect=5.0), trust_env=False)
    app = FastAPI(title="mlflow-finetune serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_entry(n, created) for n in names]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        if model not in names:
            return JSONResponse(not_found(model), status_code=404)
        return model_entry(model, created)

    loading = asyncio.Lock()

    async def load(model: str):
        """None once `model` is served, else the error response."""
        from mlflow_finetune_plugin.errors import FinetuneError

        async with loading:  # one load at a time: two first requests for a new version load it once
            if model in names:
                return None
            try:
                request = await asyncio.to_thread(resolve, model) if resolve else None
            except FinetuneError as e:
                return JSONResponse(_error(str(e), "invalid_request_error"), status_code=400)
            if request is None:
                return JSONResponse(not_found(model), status_code=404)
            answer = await client.post("/v1/load_lora_adapter", json=request)
            if answer.status_code != 200:
                return JSONResponse(_error(f"the server could not load {model}: {answer.text}", "server_error"),
                                    status_code=502)
            names.append(model)
            return None

    @app.api_route("/{path:path}", methods=["GET", "POST", "OPTIONS"])
    async def forward(path: str, request: Request):
        body = await request.body()
        if request.method == "POST" and "/" + path in _MODEL_ROUTES:
            model = _requested_model(body)
            if model is not None and model not in names:
                refused = await load(model)
                if refused is not None:
                    return refused
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS | {"host"}}
        try:
            upstream_request = client.build_request(request.method, "/" + path, params=request.query_params,
                                                    headers=headers, content=body)
            response = await client.send(upstream_request, stream=True)
        except httpx.TransportError as e:
            return JSONResponse(_error(f"the model server is not answering: {e}", "server_error"), status_code=503)
        return StreamingResponse(response.aiter_raw(), status_code=response.status_code,
                                 headers={k: v for k, v in response.headers.items()
                                          if k.lower() not in _HOP_HEADERS | {"date", "server"}},
                                 background=BackgroundTask(response.aclose))

    return app


def _error(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind}}


def _requested_model(body: bytes):
    import json

    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return None  # the server itself answers malformed requests
    return data.get("model") if isinstance(data, dict) else None


def loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_front(child_argv: list[str], names: list[str], host: str, port: int, inner_port: int,
              cwd: str | None = None, env: dict | None = None, resolve=None, echo=print) -> int:
    """Start the server (`child_argv`, listening on 127.0.0.1:`inner_port`), wait until every model in `names`
    answers, then open the front on host:port; return when a stop signal arrives or the server exits, with every
    child stopped. Returns the exit code for `serve`."""
    import uvicorn

    upstream = f"http://127.0.0.1:{inner_port}"
    server = uvicorn.Server(uvicorn.Config(build_front(list(names), upstream, resolve), host=host, port=port,
                                           log_level="warning"))
    stopped_by: list[int] = []

    def stop(signum, frame):  # uvicorn handles SIGINT/SIGTERM itself while it serves, then hands them back here
        stopped_by.append(signum)
        server.handle_exit(signum, frame)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    child = subprocess.Popen(child_argv, cwd=cwd, env={**os.environ, **(env or {})}, preexec_fn=_child_setup)
    try:
        started = time.monotonic()
        if not _wait_until_answering(upstream, names, child, lambda: bool(stopped_by)):
            return 0 if stopped_by else (child.returncode or 1)
        echo(f"Ready after {time.monotonic() - started:.0f} s: http://{host}:{port}/v1 answers for {', '.join(names)}")
        sys.stdout.flush()
        threading.Thread(target=_exit_with(child, server), daemon=True).start()
        server.run()
    finally:
        stop_group(child)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped_by:
        return 0
    return child.returncode if child.returncode else 1


def _wait_until_answering(upstream: str, names: list[str], child: subprocess.Popen, stopped) -> bool:
    """Poll until each model in `names` answers a one-token chat request (True), or the server exits or a stop
    signal arrives first (False). 4xx answers count as answering: the server is up and says why."""
    import httpx

    pending = list(names)
    with httpx.Client(base_url=upstream, timeout=httpx.Timeout(None, connect=2.0), trust_env=False) as client:
        while pending:
            if child.poll() is not None or stopped():
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


def _exit_with(child: subprocess.Popen, server):
    def watch():
        child.wait()
        server.should_exit = True

    return watch


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
