"""The A/B playground of mlflow-finetune as a plain Gradio app: the page `mlflow-finetune playground` serves,
built by the same code (`mlflow_finetune_plugin.serving.playground.launch.create_app`).

    python gradio_app/app.py --model support-bot@challenger          # arguments ...
    MLFLOW_FINETUNE_MODEL=support-bot@challenger gradio gradio_app/app.py   # ... or environment variables

`gradio gradio_app/app.py` is Gradio's reload mode (the page is rebuilt when a source file changes; arguments
go after `--`). As a Hugging Face Space, this folder is the Space (README.md holds its header): set
MLFLOW_TRACKING_URI and MLFLOW_FINETUNE_MODEL in its settings; see README.md.

Settings: --tracking-uri (MLFLOW_TRACKING_URI), --model (MLFLOW_FINETUNE_MODEL), --against
(MLFLOW_FINETUNE_AGAINST, default base), --engine (MLFLOW_FINETUNE_ENGINE: transformers, vllm, openai),
--blind (MLFLOW_FINETUNE_BLIND=1), --openai-url (MLFLOW_FINETUNE_OPENAI_URL), --device, --experiment,
--max-new-tokens, --follow-interval, --trace (MLFLOW_FINETUNE_<NAME>), --host and --port (Gradio's
GRADIO_SERVER_NAME, GRADIO_SERVER_PORT), login with MLFLOW_FINETUNE_PLAYGROUND_AUTH=user:password. Arguments
win over environment variables.
"""

import argparse
import os

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.serving.playground.app import launch
from mlflow_finetune_plugin.serving.playground.launch import PlaygroundConfig, create_app, parse_auth


def settings(argv=None) -> PlaygroundConfig:
    parser = argparse.ArgumentParser(description="The mlflow-finetune A/B playground as a Gradio app.")
    parser.add_argument("--tracking-uri", help="MLflow tracking server or store (MLFLOW_TRACKING_URI)")
    parser.add_argument("--model", help="NAME@ALIAS or NAME/VERSION (MLFLOW_FINETUNE_MODEL)")
    parser.add_argument("--against", help="the other side: base, NAME@champion, NAME/VERSION")
    parser.add_argument("--engine", choices=["transformers", "vllm", "openai"])
    parser.add_argument("--blind", action="store_true", default=None, help="start in blind mode")
    parser.add_argument("--openai-url", dest="openai_urls", action="append", metavar="[REF=]URL")
    parser.add_argument("--device", help="transformers engine: cpu, cuda, cuda:1")
    parser.add_argument("--experiment", help="MLflow experiment for votes")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--max-lora-rank", type=int, help="vllm engine: largest LoRA rank to serve")
    parser.add_argument("--follow-interval", type=float, metavar="SECONDS")
    parser.add_argument("--trace", metavar="EXPERIMENT",
                        help="record answers as MLflow traces in EXPERIMENT, votes "
                             "as feedback on them (they hold user data; off by default)")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    args = parser.parse_args(argv)
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri  # also for the processes the engines start
    given = {k: v for k, v in vars(args).items() if k != "tracking_uri"}
    given["openai_urls"] = tuple(args.openai_urls) if args.openai_urls else None
    return PlaygroundConfig.from_env(**given)


# Module level: Gradio's reload mode (`gradio gradio_app/app.py`) looks for `demo` in this module. Not in the
# engine process the vllm engine spawns, which imports this file again as `__mp_main__`: it must not start a
# second one.
if __name__ != "__mp_main__":
    try:
        config = settings()
        demo, playground = create_app(config)
    except FinetuneError as e:  # a wrong setting or model: say which, without a traceback
        raise SystemExit(f"gradio_app/app.py: {e}") from None

if __name__ == "__main__":
    try:
        launch(demo, host=config.host, port=config.port, auth=parse_auth(config.auth), block=True)
    finally:
        playground.close()
