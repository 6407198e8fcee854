"""The OpenAI-compatible front `mlflow-finetune serve --engine transformers` puts before `transformers serve`.

`transformers serve` lists the models of the hub cache rather than the one it serves (HTTP 500 where that cache does
not exist) and answers a request for another model with 400. The front answers `/v1/models` with the served names,
refuses unknown model names with 404 (as OpenAI does), and passes everything else through to the server, which runs
as a child on a loopback port in its own process group. A stop signal (SIGTERM, SIGINT, SIGHUP) to `serve` ends the
front and then that whole group; the child also gets SIGTERM from the kernel if `serve` dies without cleaning up.
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


def build_front(names: list[str], upstream: str):
    """The front's ASGI app: `names` are the models served, `upstream` the server's base URL."""
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

    @app.api_route("/{path:path}", methods=["GET", "POST", "OPTIONS"])
    async def forward(path: str, request: Request):
        body = await request.body()
        if request.method == "POST" and "/" + path in _MODEL_ROUTES:
            model = _requested_model(body)
            if model is not None and model not in names:
                return JSONResponse(not_found(model), status_code=404)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS | {"host"}}
        try:
            upstream_request = client.build_request(request.method, "/" + path, params=request.query_params,
                                                    headers=headers, content=body)
            response = await client.send(upstream_request, stream=True)
        except httpx.TransportError as e:
            return JSONResponse({"error": {"message": f"the model server is not answering: {e}",
                                           "type": "server_error"}}, status_code=503)
        return StreamingResponse(response.aiter_raw(), status_code=response.status_code,
                                 headers={k: v for k, v in response.headers.items()
                                          if k.lower() not in _HOP_HEADERS | {"date", "server"}},
                                 background=BackgroundTask(response.aclose))

    return app


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
              cwd: str | None = None, env: dict | None = None) -> int:
    """Start the server (`child_argv`, listening on 127.0.0.1:`inner_port`) and the front on host:port; return when
    a stop signal arrives or the server exits, with every child stopped. Returns the exit code for `serve`."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(build_front(names, f"http://127.0.0.1:{inner_port}"), host=host,
                                           port=port, log_level="warning"))
    stopped_by: list[int] = []

    def stop(signum, frame):  # uvicorn handles SIGINT/SIGTERM itself while it serves, then hands them back here
        stopped_by.append(signum)
        server.handle_exit(signum, frame)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    child = subprocess.Popen(child_argv, cwd=cwd, env={**os.environ, **(env or {})}, preexec_fn=_child_setup)
    try:
        threading.Thread(target=_exit_with(child, server), daemon=True).start()
        server.run()
    finally:
        stop_group(child)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped_by:
        return 0
    return child.returncode if child.returncode else 1


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
