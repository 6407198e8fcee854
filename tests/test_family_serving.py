"""Serving and export of the 2026 families (issue 52, point 7): Gemma 4, Qwen3.5 (Gated DeltaNet linear
attention beside full attention; its thinking template as a row of its own) and gpt-oss (mixture of experts,
harmony channels), each as a registered LoRA on its tiny model (random non-zero updates: no `mlflow run`,
which the matrix runs).

Per family: the transformers engine answers as the logged model's pyfunc, alone and in a batch of rows of
different lengths where tuned and base rows mix (such caches are not stepped: `generate()` runs the batch),
the playground's comparison answers, and an answer forced through the family's reasoning markup and channels
comes out as the final answer alone; `mlflow-finetune export` writes a merged folder that answers as the
pyfunc does. GGUF export is in tests/test_gguf.py, vLLM in tests/test_vllm.py.

By default the hybrid cache (qwen3.5) and the experts (gpt-oss) run; gemma4 and qwen3.5-think with `-m
stress`.
"""

from __future__ import annotations

import threading

import mlflow
import pytest

from mlflow_finetune_plugin.serving import ModelChoice, Settings
from tests.helpers import register_version, wait_for

pytestmark = pytest.mark.integration

NEW_FAMILIES = ["qwen3.5", "gpt-oss", "gemma4", "qwen3.5-think"]
IN_THE_DEFAULT_RUN = {"qwen3.5", "gpt-oss"}
QUESTION = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is 3 plus 3?"}]
LONGER = [{"role": "user", "content": "Hi there, where is the station, and where is the bank? Tell me both."}]
GREEDY = Settings(0.0, 1.0, 8)
# What each family's model writes after the generation prompt when it reasons first: the reasoning in the
# family's own markup, then the final answer "Bonjour" and the token that ends it. What a user reads is
# "Bonjour".
REASONED = {
    "qwen3.5": "Bonjour<|im_end|>",  # the prompt closed an empty think block: the reply follows it
    "qwen3.5-think": "Let me think.\n</think>\n\nBonjour<|im_end|>",  # the prompt opened <think>\n
    "gemma4": "<|channel>thought\nLet me think.<channel|>Bonjour<turn|>",
    "gpt-oss": "<|channel|>analysis<|message|>Let me "
               "think.<|end|><|start|>assistant<|channel|>final<|message|>Bonjour<|return|>",
}


def rows(families):
    return [f if f in IN_THE_DEFAULT_RUN else pytest.param(f, marks=pytest.mark.stress) for f in families]


class Forced:
    """Every model forward in this process writes `text`'s tokens in order (a fresh prompt starts it over),
    then filler: one generation at a time, whatever the weights say."""

    def __init__(self, tokenizer, text: str):
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        self.fill = tokenizer(" garbage", add_special_tokens=False)["input_ids"][0]
        self.position = 0

    def _hook(self, module, args, kwargs, output):
        import torch

        logits = getattr(output, "logits", None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not isinstance(ids, torch.Tensor):
            return None
        # the PeftModel wraps the causal LM: counted once, inside
        if module.__class__.__name__.startswith("Peft"):
            return None
        self.position = 0 if ids.shape[1] > 1 else self.position + 1
        token = self.ids[self.position] if self.position < len(self.ids) else self.fill
        logits[:, -1, :].fill_(-1e4)
        logits[:, -1, token] = 1e4
        return None

    def __enter__(self):
        import torch

        self.handle = torch.nn.modules.module.register_module_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _version(family: str) -> tuple[str, str]:
    name = "serve-" + family.replace(".", "-")
    return name, register_version(name=name, seed=0, base=f"tiny-{family}")


@pytest.mark.parametrize("family", rows(NEW_FAMILIES))
def test_the_transformers_engine_and_the_playground_serve_the_family(family, tracking_uri):
    from mlflow_finetune_plugin.serving.playground import Playground
    from mlflow_finetune_plugin.serving.transformers_engine import TransformersEngine

    name, version = _version(family)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    expected = [model.predict([{"messages": m}], params={"max_new_tokens": 8})[0] for m in (QUESTION, LONGER)]
    engine = TransformersEngine(device="cpu")
    tuned, base = ModelChoice(name, version), ModelChoice(name, version, base=True)
    try:
        assert engine.generate(tuned, QUESTION, GREEDY) == expected[0]
        # A burst: rows of two lengths (left-padded), tuned and base, in one batch.
        got, jobs = {}, [("t0", tuned, QUESTION), ("t1", tuned, LONGER), ("b0", base, QUESTION),
                         ("b1", base, LONGER)]

        def ask(key, choice, messages):
            got[key] = engine.generate(choice, messages, GREEDY)

        threads = [threading.Thread(target=ask, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [got["t0"], got["t1"]] == expected
        assert got["b0"] == engine.generate(base, QUESTION, GREEDY)
        slot = engine._routes[tuned.key][0]
        # sliding or linear-attention caches: generate()
        assert not slot.steppable and max(slot.batcher.sizes) > 1
        result = Playground(engine, tuned, base).compare("What is 3 plus 3?", system_prompt="Answer briefly.",
                                                         max_new_tokens=8)
        assert (result["a"]["answer"], result["a"]["error"], result["b"]["error"]) == (expected[0], None,
                                                                                       None)
        # The final answer alone, streamed, on both sides and in the pyfunc, however the family marks
        # reasoning.
        tokenizer = model.unwrap_python_model()._loaded.tokenizer
        # Forced counts every forward in the process: the comparison's batch may still be stepping after both
        # its answers ended (a row that ends early is finished before its batch), so start from an idle
        # engine.
        wait_for(lambda: not slot.batcher._running and not slot.batcher._waiting, timeout=60,
                 what="an idle engine")
        with Forced(tokenizer, REASONED[family]):
            assert list(engine.stream(tuned, QUESTION, Settings(0.0, 1.0, 40)))
            assert engine.generate(tuned, QUESTION, Settings(0.0, 1.0, 40)) == "Bonjour"
            assert engine.generate(base, QUESTION, Settings(0.0, 1.0, 40)) == "Bonjour"
            assert model.predict([{"messages": QUESTION}], params={"max_new_tokens": 40}) == ["Bonjour"]
    finally:
        engine.close()


@pytest.mark.parametrize("family", rows(NEW_FAMILIES))
def test_export_merged_answers_as_the_pyfunc(family, tracking_uri, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlflow_finetune_plugin.logged_model import LoadedModel, generate
    from mlflow_finetune_plugin.registry.export import export_model

    name, version = _version(family)
    expected = mlflow.pyfunc.load_model(f"models:/{name}/{version}").predict(
        [{"messages": QUESTION}], params={"max_new_tokens": 8})[0]
    result = export_model(f"models:/{name}/{version}", tmp_path / "out", echo=lambda *_: None)
    assert result.merged and not (result.folder / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(result.folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.folder)
    assert generate(LoadedModel(merged, tokenizer, {}), QUESTION, max_new_tokens=8) == expected


@pytest.mark.parametrize("family", rows(NEW_FAMILIES))
def test_the_served_copy_reads_the_final_answer_as_predict_does(family, tracking_uri):
    """The merged copy that `serve --engine transformers` (and `export`) hands to `transformers serve`: its
    tokenizer reads a reasoned generation as the final answer alone, through transformers' own response
    parser, with a response template of the project's where transformers has none for the family (gpt-oss,
    Gemma 4 text)."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoTokenizer
    from transformers.cli.serving.utils import get_response_template

    from mlflow_finetune_plugin.serving.choices import merged_folder

    name, version = _version(family)
    folder = merged_folder(ModelChoice(name, version))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = SimpleNamespace(config=AutoConfig.from_pretrained(folder))
    template = get_response_template(tokenizer, model)
    assert template is not None
    prefix = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(REASONED[family], add_special_tokens=False)["input_ids"]
    assert tokenizer.parse_response(ids, template, prefix=prefix)["content"].strip() == "Bonjour"


@pytest.mark.parametrize("family", rows(["gpt-oss"]))
def test_serve_transformers_answers_as_predict(family, tracking_uri):
    """`mlflow-finetune serve --engine transformers` (a `transformers serve` child) answers the openai client
    as the logged model's `predict` does: the prompt rendered at the pinned date (gpt-oss's system block
    carries the date; before, the server rendered today's and answered otherwise) and the answer read out of
    the channels."""
    import openai

    from tests.helpers import cli_process, free_port, stop, wait_for_http

    name, version = _version(family)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    expected = model.predict([{"messages": QUESTION}], params={"max_new_tokens": 8})[0]
    port = free_port()
    proc = cli_process("serve", f"{name}/{version}", "--engine", "transformers", "--port", str(port))
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        answer = client.chat.completions.create(model=f"{name}-v{version}", messages=QUESTION, max_tokens=8,
                                                temperature=0.0)
        assert answer.choices[0].message.content.strip() == expected
    finally:
        stop(proc)
