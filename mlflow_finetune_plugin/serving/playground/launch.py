"""`mlflow-finetune playground`: resolve the two models, start the engine, load them, serve the page."""

from __future__ import annotations

import os

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.serving.server import LOOPBACK


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """`user:pass` as gradio's auth tuple."""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise FinetuneError("--auth takes USER:PASSWORD, e.g. --auth alice:s3cret")
    return user, password


def parse_pairs(values, what: str, default_name: str | None = None, base_of=None) -> dict[str, str]:
    """`REF=VALUE` options (`bot@challenger=http://...`) keyed by model choice key."""
    from mlflow_finetune_plugin.serving.choices import parse_ref

    out = {}
    for item in values or ():
        ref, sep, value = item.partition("=")
        if not sep or not ref or not value:
            raise FinetuneError(f"{what} {item!r}: expected REF=VALUE, e.g. {what} bot@challenger=bot-v3")
        out[parse_ref(ref, default_name=default_name, base_of=base_of).key] = value
    return out


def make_engine(engine: str, model, openai_urls=(), served_models=(), device: str | None = None,
                concurrency: int | None = None, max_lora_rank: int = 64):
    """The engine named `engine`, configured from the command line's options."""
    from mlflow_finetune_plugin.serving import ENGINES

    if engine not in ENGINES:
        raise FinetuneError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    kwargs = {} if concurrency is None else {"concurrency": concurrency}
    if engine == "transformers":  # its default lets 16 comparisons in at once: they share batched generates
        return ENGINES[engine](device=device, **kwargs)
    if engine == "vllm":
        return ENGINES[engine](max_lora_rank=max_lora_rank, **kwargs)
    defaults = [u for u in openai_urls if "=" not in u.split("://", 1)[0]]
    per_side = [u for u in openai_urls if u not in defaults]
    if len(defaults) > 1:
        raise FinetuneError("give one default --openai-url; direct single models elsewhere with "
                            "--openai-url REF=URL")
    return ENGINES[engine](base_url=defaults[0] if defaults else None,
                           urls=parse_pairs(per_side, "--openai-url", model.name, model),
                           models=parse_pairs(served_models, "--served-model", model.name, model), **kwargs)


def run_playground(model_ref: str, against: str = "base", engine: str = "transformers", host: str = "127.0.0.1",
                   port: int = 7860, auth: str | None = None, blind: bool = False, openai_urls=(),
                   served_models=(), max_new_tokens: int = 512, concurrency: int | None = None,
                   device: str | None = None, experiment: str | None = None, max_lora_rank: int = 64,
                   echo=print) -> None:
    """Start the playground and serve it until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from mlflow_finetune_plugin.arena.votes import EXPERIMENT
    from mlflow_finetune_plugin.serving.choices import parse_ref

    credentials = parse_auth(auth)
    model = parse_ref(model_ref)
    other = parse_ref(against, default_name=model.name, base_of=model)
    if host not in LOOPBACK and not credentials:
        echo(f"Warning: serving on {host} without --auth: anyone who can reach this machine can use the models, "
             "vote and promote.")
    eng = make_engine(engine, model, openai_urls, served_models, device, concurrency, max_lora_rank)
    from mlflow_finetune_plugin.serving.playground.app import build_app, launch
    from mlflow_finetune_plugin.serving.playground.core import Playground

    echo(f"Loading {model.key} and {other.key} with the {eng.name} engine…")
    for choice in (model, other):  # fail here, with the reason, rather than on the first question
        if eng.name != "openai":
            eng.prepare(choice)
    pg = Playground(eng, model, other, experiment=experiment or EXPERIMENT, max_new_tokens_cap=max_new_tokens,
                    blind=blind)
    demo = build_app(pg)
    try:
        launch(demo, host=host, port=port, auth=credentials, block=True)
    finally:
        eng.close()
