"""What several commands share: recipe overrides (-P), NAME=VALUE options, serving's --trace and
--follow-interval, and the servers' default ports with the check that a port is free."""

from __future__ import annotations

import click


def assignments(values, option: str, valid) -> dict:
    out = {}
    for item in values:
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint=option)
        if key not in valid:
            raise click.BadParameter(f"{key!r} is not one of {', '.join(valid)}", param_hint=option)
        out[key] = value
    return out


def pairs(values, extra_args) -> dict:
    """`-P key=value` options plus `--key value` pairs (how MLflow's local backend passes undeclared
    params)."""
    out = {}
    for item in values:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not key=value (e.g. -P train.max_steps=20)",
                                     param_hint="-P")
        out.update([item.split("=", 1)])
    args = list(extra_args)
    while args:
        key = args.pop(0)
        if not key.startswith("--") or not args:
            raise click.UsageError(f"unexpected argument {key!r}; pass recipe overrides as -P key=value")
        out[key[2:]] = args.pop(0)
    return out



# Shared by `serve` and `playground` (and gradio_app/app.py's MLFLOW_FINETUNE_TRACE, ..._FOLLOW_INTERVAL).
TRACE_OPTION = click.option("--trace", default=None, metavar="EXPERIMENT", envvar="MLFLOW_FINETUNE_TRACE",
    help="Record each answer as an MLflow trace in EXPERIMENT, under the served version's logged model, with "
         "users' feedback: the next fine-tune's traces:EXPERIMENT data. Off by default: traces hold your "
         "users' prompts and answers (docs/traces.md). serve: header x-mlflow-trace-id names an answer's "
         "trace, POST /v1/feedback rates it.")
FOLLOW_OPTION = click.option(
    "--follow-interval", type=click.FloatRange(min=0), default=10.0, show_default=True, metavar="SECONDS",
    envvar="MLFLOW_FINETUNE_FOLLOW_INTERVAL", help="How often to look up models given by alias "
                                                   "(NAME@champion) in the registry: when the alias moves, "
                                                   "the new version answers without a restart (requests "
                                                   "under way finish on theirs). 0: keep the one at start.")


# Each server's default port is its own: two of them started with their defaults side by side do not collide.
SERVE_PORT, OPENAI_API_PORT, PLAYGROUND_PORT, STUDIO_PORT = 8000, 8100, 7860, 7870


def port_free(host: str, port: int) -> None:
    """Refuse a port another process listens on before anything loads, naming the next free one (a server's
    own error comes minutes later, after the models load, or as a traceback)."""
    import socket

    def taken(candidate: int) -> bool:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is free
            try:
                s.bind((host, candidate))
            except OSError:
                return True
        return False

    if port and taken(port):
        free = next((p for p in range(port + 1, min(port + 100, 65536)) if not taken(p)), None)
        hint = f": try --port {free}" if free else ""
        raise click.UsageError(f"port {port} on {host} is in use (another server?){hint}")
