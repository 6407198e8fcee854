"""The A/B playground (Gradio): `build_app(Playground(engine, model, against))` returns the page as gr.Blocks."""

from gradio_app.app import build_app, launch
from gradio_app.playground import Playground

__all__ = ["Playground", "build_app", "launch"]
