"""The forgetting check: general text scored with the base and the tuned model after every evaluated run
(`eval/forgetting/*`), its recipe key, and the promotion gate that refuses a version that forgot too much."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner

from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.data.text import read_texts
from mlflow_finetune_plugin.errors import FinetuneError, RecipeError
from mlflow_finetune_plugin.evaluate import forgetting
from mlflow_finetune_plugin.models.base import load_base_model, load_tokenizer
from mlflow_finetune_plugin.registry.promotion import parse_gate, promote
from mlflow_finetune_plugin.train.adapters import attach
from mlflow_finetune_plugin.train.job import run
from tests.helpers import FAST_OVERRIDES, chat_rows, jsonl

FORGETTING_GATE = "forgetting/ppl_ratio<=1.2"


def _project(root: Path, rows: list[dict] | None = None, extra: str = "",
             registry: str = "name: bot") -> Path:
    jsonl(root / "data" / "train.jsonl", rows or chat_rows(8))
    jsonl(root / "data" / "eval.jsonl", chat_rows(2, 50))
    (root
     / "finetune.yaml").write_text("data: {train: data/train.jsonl, eval: data/eval.jsonl, max_length: 64}\n"
                                   f"registry: {{{registry}}}\n" + extra)
    return root


def test_the_recipe_names_the_set_or_turns_it_off(tmp_path):
    root = _project(tmp_path)
    assert forgetting.set_path(load_recipe(root)) == forgetting.BUNDLED  # on by default, the bundled set
    assert forgetting.read_set(load_recipe(root, overrides={"eval.forgetting": "false"})) == []
    assert forgetting.read_set(load_recipe(root, overrides={"eval.enabled": "false"})) == []
    (root / "general.txt").write_text("First paragraph,\nstill the first.\n\n\nSecond one.\n")
    recipe = load_recipe(root, overrides={"eval.forgetting": "general.txt"})
    assert recipe.eval.forgetting == str(root / "general.txt")  # made absolute, like the data files
    assert forgetting.read_set(recipe) == ["First paragraph,\nstill the first.", "Second one."]
    jsonl(root / "general.jsonl", [{"text": "One."}, {"text": "Two."}])
    assert forgetting.read_set(load_recipe(root, overrides={"eval.forgetting": "general.jsonl"})) == ["One.",
                                                                                                      "Two."]

    with pytest.raises(RecipeError) as err:
        load_recipe(root, overrides={"eval.forgetting": "missing.txt", "eval.max_examples": 0})
    assert "eval.forgetting: file not found: missing.txt" in str(err.value)
    assert "eval.max_examples" in str(err.value)  # with every other problem at once
    with pytest.raises(RecipeError, match=r"eval.forgetting: .*\.txt / \.jsonl"):
        load_recipe(root, overrides={"eval.forgetting": "notes.md"})
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    with pytest.raises(FinetuneError, match=r"bad.jsonl:2: expected \{\"text\""):
        forgetting.read_set(load_recipe(root, overrides={"eval.forgetting": "bad.jsonl"}))


def test_the_bundled_set_is_general_prose_with_its_license_note():
    texts = read_texts(forgetting.BUNDLED, "eval.forgetting")
    assert len(texts) >= 15 and len(set(texts)) == len(texts)
    # words; about 1,600 tokens with smollm2's tokenizer
    assert 1200 <= sum(len(t.split()) for t in texts) <= 1800
    note = (forgetting.BUNDLED.parent / "README.md").read_text()
    assert "original text" in note and "Apache-2.0" in note


@pytest.mark.parametrize("adapter", ["lora", "prompt", "prefix"])
def test_the_base_is_the_same_weights_with_the_adapter_off(adapter, tmp_path):
    """Base figures equal the plain base model's for every kind of adapter (prompt tuning prepends virtual
    tokens, prefix tuning keys and values); the figures are consistent with each other."""
    recipe = load_recipe(_project(tmp_path), overrides={"adapter.type": adapter})
    tokenizer, texts = load_tokenizer(), forgetting.read_set(recipe)[:10]
    torch.manual_seed(0)
    plain = load_base_model(recipe.model)
    nll, n = forgetting.text_nll(plain, tokenizer, texts, recipe.data.max_length)
    model = attach(plain, recipe)
    metrics = forgetting.measure(recipe, texts, model, tokenizer)
    assert metrics["n_tokens"] == n > 0
    assert metrics["base_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert metrics["base_ppl"] == pytest.approx(math.exp(metrics["base_loss"]))
    assert metrics["ppl_ratio"] == pytest.approx(math.exp(metrics["tuned_loss"] - metrics["base_loss"]))
    if adapter == "lora":  # a fresh LoRA adapter adds zero: tuned is the base
        assert metrics["tuned_loss"] == pytest.approx(metrics["base_loss"], rel=1e-6)
    else:  # random virtual tokens change what the model predicts
        assert metrics["tuned_loss"] != pytest.approx(metrics["base_loss"], rel=1e-6)


def test_one_adapter_per_task_reports_each_and_the_worst(tmp_path):
    from peft import LoraConfig, get_peft_model

    jsonl(tmp_path / "data" / "a.jsonl", chat_rows(4))
    jsonl(tmp_path / "data" / "b.jsonl", chat_rows(4, 10))
    (tmp_path / "finetune.yaml").write_text("data: {adapters: per_task, max_length: 64, tasks: "
                                            "{a: {train: data/a.jsonl}, b: {train: data/b.jsonl}}}\n")
    recipe = load_recipe(tmp_path)
    tokenizer, texts = load_tokenizer(), forgetting.read_set(recipe)[:6]
    torch.manual_seed(0)
    model = get_peft_model(load_base_model(recipe.model), LoraConfig(r=4, target_modules=["q_proj"]), "a")
    # b moved away
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    metrics = forgetting.measure(recipe, texts, model, tokenizer)
    assert metrics["a/tuned_loss"] == pytest.approx(metrics["base_loss"], rel=1e-6)
    assert metrics["b/tuned_loss"] != pytest.approx(metrics["base_loss"], rel=1e-6)
    # the top-level figures: the worst adapter
    worst = max("ab", key=lambda task: metrics[f"{task}/tuned_loss"])
    assert (metrics["tuned_loss"], metrics["ppl_ratio"]) == (metrics[f"{worst}/tuned_loss"],
                                                             metrics[f"{worst}/ppl_ratio"])


def _metrics_of_version(version: str) -> dict:
    mv = mlflow.MlflowClient().get_model_version("bot", version)
    return mlflow.MlflowClient().get_run(mv.run_id).data.metrics


def test_every_run_measures_forgetting_and_a_gate_refuses_a_version_that_forgot(tmp_path, tracking_uri):
    gate = "name: bot, auto_promote: true, promote_if: [{metric: forgetting/ppl_ratio, at_most: 1.2}]"
    # v1: DPO (not SFT: every objective's evaluation is followed by the check), a LoRA adapter, a small step.
    prefs = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
              "chosen": [{"role": "assistant", "content": f"{2 * i}"}],
              "rejected": [{"role": "assistant", "content": "I don't know."}]} for i in range(10)]
    dpo = _project(tmp_path / "dpo", prefs[:8], "method: dpo\n", gate)
    jsonl(dpo / "data" / "eval.jsonl", prefs[8:])
    assert run(load_recipe(dpo, overrides=FAST_OVERRIDES)) == 0
    # v2: a full fine-tune at a learning rate that wrecks the (tiny) model's general text.
    full = _project(tmp_path / "full", extra="method: full\n", registry=gate)
    assert run(load_recipe(full, overrides={**FAST_OVERRIDES, "train.learning_rate": 0.05,
                                            "train.max_steps": 6, "train.save_steps": 6})) == 0

    for version in ("1", "2"):
        m = _metrics_of_version(version)
        assert m["eval/forgetting/n_tokens"] > 1000
        assert m["eval/forgetting/ppl_ratio"] == pytest.approx(m["eval/forgetting/tuned_ppl"] /
                                                               m["eval/forgetting/base_ppl"])
        assert m["eval/forgetting/ppl_ratio"] == pytest.approx(
            math.exp(m["eval/forgetting/tuned_loss"] - m["eval/forgetting/base_loss"]))
    v1, v2 = _metrics_of_version("1"), _metrics_of_version("2")
    # The same base, whether it is the adapter switched off (v1) or the base loaded apart (v2).
    assert v1["eval/forgetting/base_loss"] == pytest.approx(v2["eval/forgetting/base_loss"], rel=1e-5)
    assert v1["eval/forgetting/ppl_ratio"] < 1.2 < v2["eval/forgetting/ppl_ratio"]

    # The recipe's gate: v1 was auto-promoted, v2 was refused and the champion stayed on v1.
    client = mlflow.MlflowClient()
    assert str(client.get_registered_model("bot").aliases["champion"]) == "1"
    tags = {v: client.get_run(client.get_model_version("bot", v).run_id).data.tags for v in ("1", "2")}
    assert tags["1"]["finetune.auto_promoted"] == "true" and tags["2"]["finetune.auto_promoted"] == "false"

    # The same gate on the command line; and a limit v2 does meet lets it through.
    out = CliRunner().invoke(main, ["promote", "bot", "--version", "2", "--gate", FORGETTING_GATE])
    assert out.exit_code == 1, out.output  # refused
    assert "FAIL" in out.output and "<= 1.2" in out.output and "stays on v1" in out.output
    loose = f"eval/forgetting/ppl_ratio<={v2['eval/forgetting/ppl_ratio'] * 1.01}"
    assert promote("bot", "2", "champion", [parse_gate(loose)]).promoted
    # A limit on a metric the run does not have is refused, as any gate's; `>=` limits the tuned model's
    # metrics.
    with pytest.raises(FinetuneError, match="missing metric eval/forgetting/typo_ratio"):
        promote("bot", "1", "champion", [parse_gate("forgetting/typo_ratio<=1.2")])
    rouge = v1["eval/tuned/rougeL"]
    assert not promote("bot", "1", "champion", [parse_gate(f"rougeL>={rouge + 0.01}")]).passed
    assert promote("bot", "1", "champion", [parse_gate(f"rougeL>={rouge}")]).promoted


def _chart_metrics(**forgetting_figures) -> dict:
    metrics = {f"eval/{c}/{m}": 0.1 * (i + 1) for i, c in enumerate(("base", "fewshot", "retrieval", "tuned"))
               for m in ("rougeL", "token_f1", "loss")}
    return {**metrics, **{f"eval/forgetting/{k}": v for k, v in forgetting_figures.items()}}


def _overlapping_labels(ax) -> list[tuple[str, str]]:
    renderer = ax.figure.canvas.get_renderer()
    labels = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.get_xticklabels()]
    return [(a, b) for i, (a, box_a) in enumerate(labels) for b,
            box_b in labels[i + 1:] if box_a.overlaps(box_b)]


def test_the_chart_reads_at_a_glance_and_shows_the_forgetting_ratio_the_verdict_cites():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from mlflow_finetune_plugin.evaluate.report import comparison_figure

    fig = comparison_figure(_chart_metrics(base_ppl=36.0, tuned_ppl=178.2, ppl_ratio=4.95))
    FigureCanvasAgg(fig).draw()
    scores, loss, forgot = fig.axes[:3]
    # Four contender names in the narrow loss panel, each readable on its own (they used to run into one
    # word).
    assert [t.get_text() for t in loss.get_xticklabels()] == ["base", "fewshot", "retrieval", "tuned"]
    assert _overlapping_labels(loss) == [] and _overlapping_labels(scores) == []
    # The forgetting panel: both perplexities, the ratio in the title, the contenders' colours.
    assert "x4.95" in forgot.get_title()
    title = forgot.title.get_window_extent(fig.canvas.get_renderer())
    assert fig.bbox.x0 <= title.x0 and title.x1 <= fig.bbox.x1  # within the image, not cut at its edge
    assert [round(p.get_height(), 1) for p in forgot.patches] == [36.0, 178.2]
    assert [p.get_facecolor() for p in forgot.patches] == [loss.patches[0].get_facecolor(),
                                                           loss.patches[3].get_facecolor()]
    assert len(comparison_figure(_chart_metrics()).axes) == 2  # no forgetting measured: no empty panel


def test_the_check_draws_the_runs_chart_again_with_its_ratio(tmp_path, tracking_uri, monkeypatch):
    from mlflow_finetune_plugin.evaluate import report

    recipe = load_recipe(_project(tmp_path))
    tokenizer, texts = load_tokenizer(), forgetting.read_set(recipe)[:2]
    model = attach(load_base_model(recipe.model), recipe)
    drawn, draw = [], report.comparison_figure

    def recorded(metrics):
        drawn.append(dict(metrics))
        return draw(metrics)

    monkeypatch.setattr(report, "comparison_figure", recorded)
    with mlflow.start_run() as run:
        mlflow.log_metrics(_chart_metrics())
        metrics = forgetting.check(recipe, texts, model, tokenizer)
    assert drawn[-1]["eval/forgetting/ppl_ratio"] == pytest.approx(metrics["ppl_ratio"])
    assert drawn[-1]["eval/tuned/rougeL"] == pytest.approx(0.4)  # with the contenders' scores the run logged
    assert report.CHART_FILE in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id,
                                                                                      "eval")}
