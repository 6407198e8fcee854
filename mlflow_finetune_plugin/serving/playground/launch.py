"""`mlflow-finetune playground` and gradio_app/app.py: one configuration (`PlaygroundConfig`, from options or
environment variables), one way to build the page (`create_app`): resolve the two models, start the engine,
load them, follow the ones given by alias."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.runtime import threads
from mlflow_finetune_plugin.serving.follow import DEFAULT_INTERVAL_S, Followed
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
        chosen = threads.start(None, "playground")  # this process generates: its share of the machine's cores
        if chosen.busy_note:
            print(chosen.busy_note, file=sys.stderr, flush=True)
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


@dataclass
class PlaygroundConfig:
    """What a playground is started with: `mlflow-finetune playground`'s options, or gradio_app/app.py's
    arguments and environment variables (`from_env`)."""

    model: str
    against: str = "base"
    engine: str = "transformers"
    blind: bool = False
    host: str = "127.0.0.1"
    port: int = 7860
    auth: str | None = None
    openai_urls: tuple[str, ...] = ()
    served_models: tuple[str, ...] = ()
    max_new_tokens: int = 512
    concurrency: int | None = None
    device: str | None = None
    experiment: str | None = None
    max_lora_rank: int = 64
    follow_interval: float = DEFAULT_INTERVAL_S
    trace: str | None = None  # the experiment answers are traced in (off: None); traces hold user data

    @classmethod
    def from_env(cls, environ=os.environ, **given) -> PlaygroundConfig:
        """The settings `given` (None: not given), else from `environ` (ENV_VARS; the others have none), else
        the defaults."""
        values = {}
        for name in (f.name for f in fields(cls)):
            variable = ENV_VARS.get(name)
            if given.get(name) is not None:
                values[name] = given[name]
            elif variable and environ.get(variable):
                values[name] = _parse_env(name, variable, environ[variable])
        if not values.get("model"):
            raise FinetuneError(f"which model? Give --model NAME@ALIAS or set {ENV_VARS['model']} (e.g. "
                                "support-bot@challenger)")
        return cls(**values)


# Each setting's environment variable (gradio_app/app.py; Gradio's own for the address, as Hugging Face Spaces
# set).
ENV_VARS = {"model": "MLFLOW_FINETUNE_MODEL", "against": "MLFLOW_FINETUNE_AGAINST",
            "engine": "MLFLOW_FINETUNE_ENGINE", "blind": "MLFLOW_FINETUNE_BLIND",
            "host": "GRADIO_SERVER_NAME", "port": "GRADIO_SERVER_PORT",
            "auth": "MLFLOW_FINETUNE_PLAYGROUND_AUTH", "openai_urls": "MLFLOW_FINETUNE_OPENAI_URL",
            "max_new_tokens": "MLFLOW_FINETUNE_MAX_NEW_TOKENS", "device": "MLFLOW_FINETUNE_DEVICE",
            "experiment": "MLFLOW_FINETUNE_EXPERIMENT", "follow_interval": "MLFLOW_FINETUNE_FOLLOW_INTERVAL",
            "trace": "MLFLOW_FINETUNE_TRACE"}


def _parse_env(name: str, variable: str, text: str):
    try:
        if name == "blind":
            if text.strip().lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError("use 1/true/yes or 0/false/no")
            return text.strip().lower() in ("1", "true", "yes")
        if name in ("port", "max_new_tokens"):
            return int(text)
        if name == "follow_interval":
            return float(text)
    except ValueError as e:
        raise FinetuneError(f"{variable}={text!r}: {e}") from None
    return tuple(text.split()) if name == "openai_urls" else text


def create_app(config: PlaygroundConfig, echo=print):
    """The playground page for `config`, as a gr.Blocks: both models resolved (a side given by alias follows
    it) and loaded; returns (demo, playground). `playground.close()` releases the engine."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from mlflow_finetune_plugin.arena.votes import EXPERIMENT
    from mlflow_finetune_plugin.serving.choices import parse_ref
    from mlflow_finetune_plugin.serving.follow import AliasWatch, followed
    from mlflow_finetune_plugin.serving.playground.app import build_app
    from mlflow_finetune_plugin.serving.playground.core import Playground, PromptSide

    model = parse_ref(config.model)
    prompted = config.against.strip().startswith("prompts:/")
    other = PromptSide.from_registry(config.against.strip()) if prompted else parse_ref(
        config.against, default_name=model.name, base_of=model)
    eng = make_engine(config.engine, model, config.openai_urls, config.served_models, config.device,
                      config.concurrency, config.max_lora_rank)
    echo(f"Loading {model.key} and {other.key} with the {eng.name} engine…")
    if prompted:
        echo(
            f"{other.key} ({config.against.strip()}, fixed at start): {other.model.key} asked with the "
            "registered prompt")
    # fail here, with the reason, not on a question
    for choice in (model, other.model if prompted else other):
        if eng.name != "openai":
            eng.prepare(choice)
    watch = AliasWatch(_loader(eng), config.follow_interval, echo)
    sides = []
    for ref, choice in ((config.model, model), (config.against, other)):
        # a prompt is fixed at start
        may_follow = config.follow_interval > 0 and not isinstance(choice, PromptSide)
        follows = followed(ref, default_name=model.name, base_of=sides[0] if sides and isinstance(
            sides[0], Followed) else None) if may_follow else None
        sides.append(follows or choice)
        if follows:
            watch.follow(follows, choice)
            echo(f"{follows.key} is followed (registry checked every {config.follow_interval:g} s): after a "
                 "promotion, new conversations answer with the version it names")
    tracer = None
    if config.trace:
        from mlflow_finetune_plugin.serving.tracing import Tracer

        tracer = Tracer(config.trace, "playground", echo)
        echo(
            f"Tracing: each answer is recorded as an MLflow trace in experiment {config.trace!r} (traces "
            "hold the users' prompts and answers); a vote logs feedback on both answers' traces")
    pg = Playground(eng, sides[0], sides[1], experiment=config.experiment or EXPERIMENT,
                    max_new_tokens_cap=config.max_new_tokens, blind=config.blind, watch=watch.start(),
                    tracer=tracer)
    return build_app(pg), pg


def _loader(engine):
    """What the playground does when a followed alias moves: load the new version ahead of its first
    question."""

    def on_move(ref, old, new) -> str:
        if engine.name != "openai":
            engine.prepare(new)  # raises FinetuneError when it cannot be served: the old version stays
        return f"new conversations answer with {new.key}; conversations under way stay on {old.key}"

    return on_move


def run_playground(config: PlaygroundConfig, echo=print) -> None:
    """Start the playground and serve it until interrupted."""
    from mlflow_finetune_plugin.serving.playground.app import launch

    credentials = parse_auth(config.auth)
    if config.host not in LOOPBACK and not credentials:
        echo(
            f"Warning: serving on {config.host} without --auth: anyone who can reach this machine can use "
            "the models, vote and promote.")
    demo, pg = create_app(config, echo)
    try:
        launch(demo, host=config.host, port=config.port, auth=credentials, block=True)
    finally:
        pg.close()
