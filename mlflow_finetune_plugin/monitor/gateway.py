"""The MLflow AI Gateway endpoints a judge reaches its model through (`gateway:/ENDPOINT`): checked, or made
for an OpenAI-compatible URL, on the tracking server (`mlflow server` on a database store).

MLflow 3.17 has no public client for gateway endpoints: the UI and `mlflow.assistant` use the tracking store's
gateway methods (secrets, model definitions, endpoints), which a server's store sends over REST; so does this
module, through the store `mlflow.tracking` resolves for the current tracking URI."""

from __future__ import annotations

import hashlib
import os
import re

from mlflow_finetune_plugin.errors import FinetuneError

PREFIX = "finetune-judge"        # the endpoints made here: finetune-judge-<model>-<hash of URL and model>
KEY_ENV = "OPENAI_API_KEY"       # the key sent to an OpenAI-compatible judge (none needed: "unused" is sent)
PRIVATE_FIX = ("start `mlflow server` with MLFLOW_GATEWAY_API_BASE_ALLOWED_SCHEMES=http,https and "
               "MLFLOW_GATEWAY_API_BASE_ALLOW_PRIVATE_IPS=true in its environment to let its gateway reach a "
               "model on a private or plain-http address")


def tracking_server(what: str) -> str:
    """The tracking URI when it is an `mlflow server` (http/https); raises FinetuneError naming the fix
    otherwise."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        raise FinetuneError(f"{what} needs an `mlflow server` (on a database store, e.g. `mlflow server "
                            "--backend-store-uri sqlite:///mlflow.db`): MLflow's gateway endpoints and "
                            f"online scoring live there, and the tracking URI is {uri}. Set "
                            f"MLFLOW_TRACKING_URI to the server's http:// address")
    return uri


def _store():
    from mlflow.tracking._tracking_service.utils import _get_store

    return _get_store()


def missing(e) -> bool:
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    return getattr(e, "error_code", None) == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def check_endpoint(endpoint: str) -> None:
    """Raise FinetuneError unless gateway endpoint `endpoint` exists on the tracking server."""
    from mlflow.exceptions import MlflowException

    uri = tracking_server(f"--judge gateway:/{endpoint}")
    try:
        _store().get_gateway_endpoint(name=endpoint)
    except MlflowException as e:
        if missing(e):
            raise FinetuneError(
                f"--judge gateway:/{endpoint}: the server {uri} has no gateway endpoint {endpoint!r}; "
                "create it in the MLflow UI (AI Gateway), or give the judge's OpenAI-compatible URL "
                "(--judge http://HOST:PORT/v1 --judge-model NAME) and `monitor --start` makes one") from None
        raise FinetuneError(f"--judge gateway:/{endpoint}: the server {uri} answered: {e.message}") from None


def endpoint_for(url: str, model: str) -> str:
    """The name of a gateway endpoint that sends chat completions to `model` at the OpenAI-compatible `url`:
    the one
    made before for the same URL and model, or a new one (its secret holds $OPENAI_API_KEY, or "unused")."""
    from mlflow.entities.gateway_endpoint import GatewayEndpointModelConfig, GatewayModelLinkageType
    from mlflow.exceptions import MlflowException

    tracking_server(f"--judge {url}")
    name = endpoint_name(url, model)
    store = _store()
    try:
        definition = _definition(store, name, _secret(store, name, url).secret_id, model)
        _get_or_create(lambda: store.get_gateway_endpoint(name=name), lambda: store.create_gateway_endpoint(
            name=name, model_configs=[GatewayEndpointModelConfig(
                model_definition_id=definition.model_definition_id,
                linkage_type=GatewayModelLinkageType.PRIMARY)],
            usage_tracking=False))  # no experiment of gateway traces per judge call
    except MlflowException as e:
        fix = PRIVATE_FIX if "api_base" in e.message else "check the URL and the server's log"
        raise FinetuneError(f"--judge {url}: the tracking server refused the gateway endpoint {name!r} "
                            f"(MLflow: {e.message}); {fix}") from None
    return name


def endpoint_name(url: str, model: str) -> str:
    """finetune-judge-<model>-<8 hex digits of URL and model>: the same endpoint for the same judge, and a
    name the gateway accepts (letters, digits, `-`, `_`)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", model).strip("-")[:40] or "model"
    digest = hashlib.sha256(f"{url}\n{model}".encode()).hexdigest()[:8]
    return f"{PREFIX}-{slug}-{digest}"


# Over REST, secrets and model definitions are read by id only: they are found by name in their lists.


def _secret(store, name: str, url: str):
    found = next((x for x in store.list_secret_infos(provider="openai") if x.secret_name == name), None)
    return found or store.create_gateway_secret(
        secret_name=name, secret_value={"api_key": os.environ.get(KEY_ENV) or "unused"}, provider="openai",
        auth_config={"api_base": url})


def _definition(store, name: str, secret_id: str, model: str):
    found = next((d for d in store.list_gateway_model_definitions(provider="openai", secret_id=secret_id)
                  if d.name == name), None)
    return found or store.create_gateway_model_definition(name=name, secret_id=secret_id, provider="openai",
                                                          model_name=model)


def _get_or_create(get, create):
    """Get an entity, or create it where the server says it does not exist (a rerun finds what a failed run
    made)."""
    from mlflow.exceptions import MlflowException

    try:
        return get()
    except MlflowException as e:
        if not missing(e):
            raise
    return create()
