"""The A/B playground (Gradio): `build_app(Playground(engine, model, against))` returns the page as
gr.Blocks."""

from mlflow_finetune_plugin.serving.playground.app import build_app, launch
from mlflow_finetune_plugin.serving.playground.core import Playground

__all__ = ["Playground", "build_app", "launch"]
