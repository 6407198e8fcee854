"""`mlflow-finetune openai-api`: the routes of OpenAI's files and fine-tuning jobs API, the API key, and chat
with the fine-tuned models and the base models they are fine-tuned from.

A fine-tuned model (`NAME-vN`) is served on its first chat request as `serve` serves a version (`transformers
serve` on a merged copy, behind `serving/front.py`), so the `fine_tuned_model` of a job answers at
/v1/chat/completions of the same server; so does a base model the server fine-tunes (`smollm2`, `tiny`, a
--model), as its jobs train it (`serving/bases.py`): base and tuned compared through one endpoint.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations (Request) at run
# time.
import hmac
import json
import time
from dataclasses import dataclass

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.finetuning_api import progress
from mlflow_finetune_plugin.finetuning_api.files import MAX_UPLOAD_MB, FileStore
from mlflow_finetune_plugin.finetuning_api.jobs import (
    JobStore,
    Settings,
    base_models,
    base_section,
    create_job,
    fine_tunes,
    public,
)
from mlflow_finetune_plugin.finetuning_api.runner import Runner
from mlflow_finetune_plugin.finetuning_api.shapes import APIError, page

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_CHUNK = 1 << 20


@dataclass
class Service:
    store: JobStore
    files: FileStore
    runner: Runner
    settings: Settings


def _limit(value) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise APIError(400, f"limit must be a whole number (got {value!r})", code="invalid_limit",
                       param="limit") from None


def _ordered(items: list[dict]) -> list[dict]:
    """Newest first, without the private sort key."""
    return [{k: v for k, v in e.items() if k != "_t"} for e in sorted(items, key=lambda e: e["_t"],
                                                                      reverse=True)]


def build_app(service: Service, api_key: str | None, front=None):
    """The API's ASGI app; `front` (serving/front.py's app) answers everything else (chat completions)."""
    from fastapi import FastAPI

    app = FastAPI(title="mlflow-finetune openai-api", docs_url=None, redoc_url=None, openapi_url=None)
    _add_errors_and_key(app, api_key)
    _add_files(app, service.files)
    _add_jobs(app, service)
    _add_models(app, service)
    if front is not None:
        app.mount("/", front)
    return app


def _add_errors_and_key(app, api_key: str | None) -> None:
    """Refusals as OpenAI's error bodies, and the API key every request must carry (where one is set)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.exception_handler(APIError)
    async def refused(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(FinetuneError)
    async def failed(request, e: FinetuneError):
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.middleware("http")
    async def key_required(request: Request, call_next):
        if api_key:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return JSONResponse(APIError(401,
                                             "Incorrect API key provided: this server takes the key it was "
                                             "started with (--api-key).", code="invalid_api_key",).body(),
                                    status_code=401)
        return await call_next(request)


def _add_files(app, files: FileStore) -> None:
    """/v1/files: upload (size-checked before and while it is read), list, retrieve, delete, content."""
    import asyncio

    from fastapi import Request
    from fastapi.responses import Response

    @app.post("/v1/files")
    async def upload(request: Request):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > files.max_bytes + _CHUNK:  # refused before it is read
            raise APIError(413,
                           f"the upload is {declared} bytes, above this server's limit of {files.max_bytes} "
                           "bytes (--max-upload-mb)", code="file_too_large", param="file")
        form = await request.form(max_part_size=files.max_bytes + 1)
        given, purpose = form.get("file"), form.get("purpose")
        if given is None or not hasattr(given, "read"):
            raise APIError(400, "give the file as the multipart field `file`", code="missing_file",
                           param="file")
        data = bytearray()
        while chunk := await given.read(_CHUNK):
            data += chunk
            if len(data) > files.max_bytes:
                raise APIError(413, f"the file is above this server's limit of {files.max_bytes} bytes "
                                    "(--max-upload-mb)", code="file_too_large", param="file")
        return await asyncio.to_thread(files.create, bytes(data), given.filename, str(purpose or ""))

    @app.get("/v1/files")
    def list_files(purpose: str = None, after: str = None, limit: str = None, order: str = "desc"):
        return files.list(purpose, after, _limit(limit), order)

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str):
        return files.retrieve(file_id)

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str):
        return files.delete(file_id)

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str):
        return Response(files.content(file_id), media_type="application/octet-stream")


def _add_jobs(app, service: Service) -> None:
    """/v1/fine_tuning/jobs: create, list (by metadata), retrieve, cancel, pause, resume, events,
    checkpoints."""
    import asyncio

    from fastapi import Request

    store, files, runner = service.store, service.files, service.runner

    @app.post("/v1/fine_tuning/jobs")
    async def create(request: Request):
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            raise APIError(400, "the request body is not JSON", code="invalid_body") from None
        return public(await asyncio.to_thread(create_job, body, files, store, service.settings))

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(request: Request, after: str = None, limit: str = None):
        wanted = {k[len("metadata["):-1]: v for k, v in request.query_params.items()
                  if k.startswith("metadata[") and k.endswith("]")}
        jobs = [public(j) for j in store.all()
                if all((j.get("metadata") or {}).get(k) == v for k, v in wanted.items())]
        return page(jobs, after, _limit(limit))

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str):
        return public(store.get(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel(job_id: str):
        return public(runner.cancel(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    def pause(job_id: str):
        return public(runner.cancel(job_id, pause=True))

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    def resume(job_id: str):
        return public(runner.resume(job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def events(job_id: str, after: str = None, limit: str = None):
        job = store.get(job_id)
        found = job["_internal"]["events"] + progress.metric_events(job_id, job["_internal"]["runs"])
        return page(_ordered(found), after, _limit(limit), default_limit=20)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def checkpoints(job_id: str, after: str = None, limit: str = None):
        job = store.get(job_id)
        return page(progress.checkpoints(job_id, job["_internal"]["runs"]), after, _limit(limit),
                    default_limit=10)


def _add_models(app, service: Service) -> None:
    """/v1/models: the fine-tuned models, then the base models this server fine-tunes; any other GET is
    unknown."""
    store = service.store
    started = int(time.time())

    def served() -> dict:
        """The fine-tuned models (newest first), then the base models this server fine-tunes (as OpenAI lists
        its base models: owned by `system`)."""
        tuned = {j["fine_tuned_model"]: {"id": j["fine_tuned_model"], "object": "model",
                                         "created": j["finished_at"], "owned_by": "mlflow-finetune"}
                 for j in store.all() if j["fine_tuned_model"]}
        bases = {m: {"id": m, "object": "model", "created": started, "owned_by": "system"}
                 for m in base_models(service.settings) if m not in tuned}
        return {**tuned, **bases}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": list(served().values())}

    @app.get("/v1/models/{model:path}")
    def model(model: str):
        found = served().get(model)
        if found is None:
            raise APIError(404, f"The model `{model}` does not exist on this server.", code="model_not_found",
                           param="model")
        return found

    @app.get("/{path:path}")
    def unknown(path: str):  # the front forwards model requests (POST) only: no GET reaches it
        raise APIError(404, f"Unknown request URL: GET /{path}.", code="unknown_url")


def model_starter(store: JobStore, fleet, settings: Settings):
    """`start(name)` for the front: a `transformers serve` child for a job's fine-tuned model, or for a base
    model this server fine-tunes (as its jobs train it: `serving/bases.py`), once it answers; None for other
    names."""
    from mlflow_finetune_plugin.serving.base import ModelChoice
    from mlflow_finetune_plugin.serving.bases import served_base
    from mlflow_finetune_plugin.serving.front import loopback_port, wait_until_answering
    from mlflow_finetune_plugin.serving.server import folder_command, transformers_command

    def start(model: str):
        job = next((j for j in store.all() if j["fine_tuned_model"] in (model, progress.FT + model)), None)
        port = loopback_port()
        if job is not None:
            name, _, version = job["fine_tuned_model"].removeprefix(progress.FT).rpartition("-v")
            cmd = transformers_command(ModelChoice(name, version), "127.0.0.1", port)
        elif fine_tunes(model, settings):
            cmd = folder_command(served_base(base_section(model, settings)), "127.0.0.1", port)
        else:
            return None
        child = fleet.start(cmd.argv, port, cmd.names, cwd=cmd.cwd, env=cmd.env)
        if not wait_until_answering(child, fleet.stopping.is_set):
            fleet.retire(child)
            raise FinetuneError(f"the server for {model} did not start (exit code "
                                f"{child.process.returncode})")
        child.serving = True
        return child.url, cmd.names[0]

    return start


def run_api(settings: Settings, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
            max_upload_mb: int = MAX_UPLOAD_MB, echo=print) -> None:
    """Serve the API until a stop signal. Above loopback an API key is required; jobs that run go on after the
    server stops (their runs are detached), and a restarted server follows them again."""
    import uvicorn

    from mlflow_finetune_plugin.serving.front import Fleet, Routes, build_front

    if host not in LOOPBACK and not api_key:
        raise FinetuneError(f"--host {host} is reachable from other machines: give --api-key (or set "
                            "MLFLOW_FINETUNE_API_KEY); clients send it as their OpenAI API key")
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    store, files = JobStore(settings.state_dir), FileStore(max_bytes=max_upload_mb << 20)
    files.experiment_id()  # a wrong tracking store fails here, at start
    FileStore(settings.experiment).experiment_id()  # the runs' experiment, its artifacts beside the files
    runner = Runner(store, files, settings)
    fleet = Fleet()
    front = build_front(Routes([], ""), start=model_starter(store, fleet, settings))
    app = build_app(Service(store, files, runner, settings), api_key, front)
    echo(
        f"OpenAI fine-tuning API at http://{host}:{port}/v1 (files in experiment {files.experiment!r}, runs "
        f"in {settings.experiment!r}, job records in {settings.state_dir}); fine-tuned models answer at "
        f"/v1/chat/completions")
    runner.start()
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
    finally:
        runner.stop()
        fleet.stop_all()
