"""A fine-tuning job's record, and the project a create request becomes: `finetune.yaml` and its data, written
into the job's folder under the server's state folder, after every check that needs no model (the files, the
rows as `data check` words it, the model, the method, the grader, the hyperparameters). A request that fails
one of them is refused with OpenAI's 4xx error, and nothing is started.

Records are launchers/queue.py's JSON files (`STATE/jobs/<id>/job.json`, replaced atomically), so a restarted
server finds every job where it was; the runs themselves are detached and go on without the server
(runner.py)."""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_finetune_plugin.finetuning_api import graders, rows
from mlflow_finetune_plugin.finetuning_api.files import FileStore
from mlflow_finetune_plugin.finetuning_api.shapes import APIError, not_found
from mlflow_finetune_plugin.launchers import queue

TERMINAL = ("succeeded", "failed", "cancelled")
# OpenAI's hyperparameter -> the recipe key it sets ("auto": the recipe's default); beta per method.
HYPERPARAMETERS = {"n_epochs": "train.epochs", "batch_size": "train.batch_size",
                   "learning_rate_multiplier": "train.learning_rate"}
BETA = {"dpo": "dpo.beta", "reinforcement": "grpo.beta"}
KEPT_EPOCHS = 3  # OpenAI keeps a checkpoint at the end of each of a job's last three epochs
_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class Settings:
    """What the server was started with (`mlflow-finetune openai-api` options)."""

    state_dir: Path
    overrides: dict = field(default_factory=dict)      # -P for every job (the operator's, they win)
    backend_config: dict = field(default_factory=dict)  # launcher, nproc_per_node, address, ...
    experiment: str = "openai-fine-tuning"
    models: tuple[str, ...] = ()                        # base models allowed besides the built-in ones
    max_jobs: int = 1
    allow_python_graders: bool = False
    python_timeout: float = 10.0


class JobStore(queue.JobStore):
    """The job records of the server's state folder (launchers/queue.py), under OpenAI's ids, with its 404."""

    ID = re.compile(r"ftjob-[0-9a-f]{24}")  # a job id, and the name of its folder

    def unknown(self, job_id: str) -> Exception:
        """The error for an id that names no job."""
        return not_found("fine-tuning job", job_id, "fine_tuning_job_id")

    @staticmethod
    def created(job: dict) -> float:
        return job["_internal"]["created"]


def public(job: dict) -> dict:
    return {k: v for k, v in job.items() if k != "_internal"}


def add_event(job: dict, message: str, level: str = "info") -> None:
    job["_internal"]["events"].append({"object": "fine_tuning.job.event",
                                       "id": f"ftevent-{uuid.uuid4().hex[:24]}",
                                       "created_at": int(time.time()), "level": level, "message": message,
                                       "type": "message", "data": {}, "_t": time.time()})


def _hyperparameters(method: dict, kind: str) -> dict:
    given = (method.get(kind) or {}).get("hyperparameters") or {}
    if not isinstance(given, dict):
        raise APIError(400, "hyperparameters must be an object", code="invalid_hyperparameters",
                       param=f"method.{kind}.hyperparameters")
    valid = [*HYPERPARAMETERS, *(["beta"] if kind in BETA else [])]
    out = {}
    for key, value in given.items():
        param = f"method.{kind}.hyperparameters.{key}"
        if key not in valid:
            raise APIError(400, f"hyperparameter {key!r} is not mapped for a {kind} job; this server takes "
                                f"{', '.join(valid)}", code="invalid_hyperparameters", param=param)
        if value == "auto" or value is None:
            out[key] = "auto"
            continue
        whole = key in ("n_epochs", "batch_size")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or \
                (whole and int(value) != value):
            raise APIError(400, f"{key} must be 'auto' or a {'whole ' if whole else ''}number above 0 (got "
                                f"{value!r})", code="invalid_hyperparameters", param=param)
        out[key] = int(value) if whole else float(value)
    return out


def _method(body: dict) -> tuple[str, dict, dict]:
    """(kind, the method object, its hyperparameters) of a create request; the deprecated top-level
    `hyperparameters` count as supervised ones."""
    method = body.get("method") or {"type": "supervised",
                                    "supervised": {"hyperparameters": body.get("hyperparameters") or {}}}
    kind = method.get("type") if isinstance(method, dict) else None
    if kind not in rows.METHODS:
        raise APIError(400, f"method.type must be one of {', '.join(rows.METHODS)} (got {kind!r})",
                       code="invalid_method", param="method.type")
    return kind, method, _hyperparameters(method, kind)


def fine_tunes(model: str, settings: Settings) -> bool:
    """Whether this server fine-tunes (and answers as a base) `model`: a built-in model, or one given with
    --model."""
    from mlflow_finetune_plugin.models.base import is_builtin

    return model in settings.models or is_builtin(model)


def base_models(settings: Settings) -> list[str]:
    """The base models this server lists: those given with --model, then the built-in ones this machine has
    (tiny and the tiny families always; smollm2 and gemma3 where their packages are installed)."""
    import importlib.util

    from mlflow_finetune_plugin.models import gemma3, smollm2, tiny_families, tiny_vision

    installed = [m.NAME for m in (smollm2, gemma3) if importlib.util.find_spec(m.MODULE) is not None]
    return list(dict.fromkeys([*settings.models, *installed, "tiny", *tiny_families.BUILTIN_NAMES,
                               *tiny_vision.BUILTIN_NAMES]))


def base_section(model: str, settings: Settings):
    """The `model:` section a job on `model` trains with (the server's -P model.* overrides applied): how the
    base is served beside its fine-tunes."""
    import yaml

    from mlflow_finetune_plugin.config.schema import ModelConfig

    given = {k[len("model."):]: yaml.safe_load(v) if isinstance(v, str) and v.strip() else v
             for k, v in settings.overrides.items() if k.startswith("model.")}
    return ModelConfig.model_validate({**given, "name": model})


def _check_model(model, settings: Settings) -> None:
    if not isinstance(model, str) or not model:
        raise APIError(400, "model is required: the base model to fine-tune", code="missing_model",
                       param="model")
    if not fine_tunes(model, settings):
        allowed = ", ".join([*settings.models, "smollm2", "gemma3", "tiny", "tiny-<family>"])
        raise APIError(404, f"The model `{model}` does not exist or is not available for fine-tuning on this "
                            f"server (it fine-tunes: {allowed}; the operator adds others with --model).",
                       code="model_not_found", param="model")


def _file(files: FileStore, file_id, param: str) -> tuple[dict, bytes]:
    if not isinstance(file_id, str) or not file_id:
        raise APIError(400, f"{param} is required: the id of an uploaded file", code=f"missing_{param}",
                       param=param)
    info = files.retrieve(file_id, param)
    if info["purpose"] != "fine-tune":
        raise APIError(400, f"{file_id} was uploaded with purpose {info['purpose']!r}; upload it with "
                            "purpose='fine-tune'", code="invalid_purpose", param=param)
    return info, files.content(file_id, param)


def _extras(body: dict) -> tuple[str | None, int | None, dict | None]:
    suffix, seed, metadata = body.get("suffix"), body.get("seed"), body.get("metadata")
    if suffix is not None and (not isinstance(suffix, str) or len(suffix) > 64):
        raise APIError(400, "suffix must be a string of at most 64 characters", code="invalid_suffix",
                       param="suffix")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, "seed must be a whole number", code="invalid_seed", param="seed")
    if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or
                                 not all(isinstance(k, str) and isinstance(v, str) for k,
                                         v in metadata.items())):
        raise APIError(400, "metadata must map at most 16 strings to strings", code="invalid_metadata",
                       param="metadata")
    if body.get("integrations"):
        raise APIError(400, "integrations (Weights & Biases) are not served here: the job's run, metrics and "
                            "checkpoints are in MLflow", code="unsupported_integration", param="integrations")
    return suffix, seed, metadata


def registered_name(model: str, suffix: str | None) -> str:
    """The registered model a job's versions go to: `ft-MODEL[-SUFFIX]` (characters outside [A-Za-z0-9._-]
    replaced)."""
    return _NAME.sub("-", f"ft-{model}" + (f"-{suffix}" if suffix else ""))


def create_job(body, files: FileStore, store: JobStore, settings: Settings) -> dict:
    """Check a create request and write the job's project; the record starts in `validating_files`."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_body")
    _check_model(body.get("model"), settings)
    suffix, seed, metadata = _extras(body)
    kind, method, hyper = _method(body)
    train_info, train_data = _file(files, body.get("training_file"), "training_file")
    valid = body.get("validation_file")
    valid_info, valid_data = _file(files, valid, "validation_file") if valid else (None, None)

    job_id = f"ftjob-{uuid.uuid4().hex[:24]}"
    project = store.folder(job_id) / "project"
    try:
        _, columns = rows.write_rows(train_data, kind, train_info["filename"],
                                     project / "data" / "train.jsonl", "training_file")
        rows.check_rows(project / "data" / "train.jsonl", kind, train_info["filename"], "training_file")
        if valid_data is not None:
            rows.write_rows(valid_data, kind, valid_info["filename"], project / "data" / "validation.jsonl",
                            "validation_file")
            rows.check_rows(project / "data" / "validation.jsonl", kind, valid_info["filename"],
                            "validation_file", minimum=1)
        recipe = _recipe(body["model"], kind, valid_data is not None, registered_name(body["model"], suffix),
                         seed)
        if kind == "reinforcement":
            grader = (method.get("reinforcement") or {}).get("grader")
            first = next(json.loads(line)
                         for line in (project / "data" / "train.jsonl").read_text().splitlines()
                         if line.strip())
            item = {k: v for k, v in first.items() if k != "prompt"}
            graders.check_grader(grader, item, settings.allow_python_graders, settings.python_timeout)
            graders.write_rewards(project, grader, settings.python_timeout, columns)
        resolved = _resolve_hyperparameters(project, recipe, kind, hyper, settings)
    except BaseException:
        import shutil

        shutil.rmtree(store.folder(job_id), ignore_errors=True)
        raise
    job = _record(job_id, body, kind, method, resolved, suffix, seed, metadata)
    job["_internal"].update(entry_point=rows.METHODS[kind][0], project=str(project), columns=columns,
                            registered_model=recipe["registry"]["name"])
    add_event(job, f"Created fine-tuning job: {job_id}")
    return store.save(job)


def _record(job_id: str, body: dict, kind: str, method: dict, resolved: dict, suffix, seed, metadata) -> dict:
    """The job as OpenAI shapes it, and what only the server reads (`_internal`: runs, events, pause,
    resume)."""
    now = time.time()
    return {"id": job_id, "object": "fine_tuning.job", "created_at": int(now), "model": body["model"],
            "status": "validating_files", "fine_tuned_model": None, "finished_at": None,
            "hyperparameters": {k: v for k, v in resolved.items() if k not in ("beta", "seed")},
            "method": _method_out(kind, method, resolved), "training_file": body["training_file"],
            "validation_file": body.get("validation_file"), "result_files": [], "trained_tokens": None,
            "seed": seed if seed is not None else resolved["seed"], "estimated_finish": None, "error": None,
            "metadata": metadata, "organization_id": "org-local", "user_provided_suffix": suffix,
            "integrations": [], "_internal": {"created": now, "runs": [], "events": [], "pause": False,
                                              "resume_from": None}}


def _recipe(model: str, kind: str, has_eval: bool, name: str, seed: int | None) -> dict:
    data = {"train": "data/train.jsonl", "format": rows.METHODS[kind][1]}
    if has_eval:
        data["eval"] = "data/validation.jsonl"
    # As OpenAI reports a job: its training loss at every step, a checkpoint at the end of each of its last
    # three epochs (the last step is always one).
    train = {"logging_steps": 1, "save_last_epochs": KEPT_EPOCHS, **({} if seed is None else {"seed": seed})}
    recipe = {"method": rows.METHODS[kind][0], "model": {"name": model}, "data": data,
              "registry": {"name": name}, "train": train}
    if kind == "reinforcement":
        recipe["grpo"] = {"rewards": [graders.REWARD_NAME]}
    return recipe


def _resolve_hyperparameters(project: Path, recipe: dict, kind: str, hyper: dict, settings: Settings) -> dict:
    """Write finetune.yaml with the job's hyperparameters ("auto": the recipe's defaults) and load it as the
    run will (with the server's -P overrides, which win); returns the values the run trains with."""
    import yaml

    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.errors import FinetuneError

    entry_point = rows.METHODS[kind][0]

    def load():
        (project / "finetune.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        try:
            return load_recipe(project, method=entry_point, overrides=dict(settings.overrides))
        except FinetuneError as e:
            message = str(e).replace(str(project / "finetune.yaml"), "the job's recipe")
            raise APIError(400, message, code="invalid_hyperparameters",
                           param=f"method.{kind}.hyperparameters") from None

    if kind == "reinforcement":
        _fit_generations(recipe, hyper, settings)
    defaults = load()
    for key, value in hyper.items():
        if value == "auto":
            continue
        section, name = (HYPERPARAMETERS.get(key) or BETA[kind]).split(".")
        if key == "learning_rate_multiplier":
            value = defaults.train.learning_rate * value
        recipe.setdefault(section, {})[name] = value
    loaded = load()
    out = {"n_epochs": loaded.train.epochs, "batch_size": loaded.train.batch_size,
           "learning_rate_multiplier": loaded.train.learning_rate / defaults.train.learning_rate
           if "learning_rate_multiplier" in hyper and hyper["learning_rate_multiplier"] != "auto" else "auto",
           "seed": loaded.train.seed}
    if kind in BETA:
        out["beta"] = getattr(loaded, BETA[kind].split(".")[0]).beta
    return out


def _fit_generations(recipe: dict, hyper: dict, settings: Settings) -> None:
    """OpenAI has no num_generations, and GRPO needs it to divide the completions of a step: the largest that
    does, up to the recipe's default (a batch no number from 2 divides is left for the recipe check to
    refuse)."""
    from mlflow_finetune_plugin.config.schema import GRPOConfig, TrainConfig

    batch = hyper.get("batch_size", "auto")
    batch = settings.overrides.get("train.batch_size", TrainConfig().batch_size if batch == "auto" else batch)
    steps = int(batch) * int(settings.overrides.get("train.grad_accum", 1))
    fits = [n for n in range(2, GRPOConfig().num_generations + 1) if steps % n == 0]
    if fits:
        recipe["grpo"]["num_generations"] = fits[-1]


def _method_out(kind: str, method: dict, resolved: dict) -> dict:
    hyper = {k: v for k, v in resolved.items() if k != "seed" and (k != "beta" or kind in BETA)}
    out = {"type": kind, kind: {**(method.get(kind) or {}), "hyperparameters": hyper}}
    return out
