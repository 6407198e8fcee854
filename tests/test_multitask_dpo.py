"""Multi-task mixtures, DPO and sequence packing: recipes, data rules, and real (tiny) training runs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import mlflow
import pytest
import torch

from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.data.check import check_data
from mlflow_finetune_plugin.data.preflight import check_recipe_data
from mlflow_finetune_plugin.errors import FinetuneError, RecipeError
from mlflow_finetune_plugin.train.job import run
from mlflow_finetune_plugin.train.objectives.sft import packing
from tests.helpers import FAST_OVERRIDES, REPO, chat_rows, jsonl

FAST = FAST_OVERRIDES


def _multitask_project(root: Path, weights=(2, 1, 1)) -> Path:
    jsonl(root / "data" / "qa.jsonl", chat_rows(8))
    jsonl(root / "data" / "qa_eval.jsonl", chat_rows(2, 50))
    jsonl(root / "data" / "label.jsonl", [{"instruction": "Label it", "input": f"item {i}",
                                           "output": f"L{i % 3}"} for i in range(8)])
    jsonl(root / "data" / "extract.jsonl", [{"prompt": f"Order {i}?", "completion": json.dumps({"id": i})}
                                             for i in range(8)])
    (root / "finetune.yaml").write_text(f"""
method: multitask
data: {{max_length: 64, eval_split: 0.25}}
multitask:
  tasks:
    qa: {{train: data/qa.jsonl, eval: data/qa_eval.jsonl, weight: {weights[0]}}}
    label: {{train: data/label.jsonl, weight: {weights[1]}}}
    extract: {{train: data/extract.jsonl, weight: {weights[2]}}}
""")
    return root


def _pref_rows(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
             "chosen": [{"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}],
             "rejected": [{"role": "assistant", "content": "I don't know."}]}
            for i in range(offset, offset + n)]


def _finished_run(name_like: str):
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1, [r.info.status for r in runs]
    run_ = runs[0]
    assert run_.info.status == "FINISHED", run_.data.tags.get("finetune.error")
    return run_


# ---------------------------------------------------------------- multitask


def test_multitask_recipe_needs_two_tasks_existing_files_and_no_data_section(tmp_path):
    (tmp_path
     / "finetune.yaml").write_text("method: multitask\nmultitask:\n  tasks:\n    qa: {train: nope.jsonl}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(tmp_path)
    text = str(err.value)
    assert "at least two" in text and "multitask.tasks.qa.train: file not found: nope.jsonl" in text

    project = _multitask_project(tmp_path / "p")
    with pytest.raises(RecipeError, match="reads its files from multitask.tasks"):
        load_recipe(project, overrides={"data.train": "data/qa.jsonl"})
    with pytest.raises(RecipeError, match="must be letters, digits"):
        load_recipe(project, overrides={"multitask.tasks": "{'a b': {train: data/qa.jsonl}, c: {train: x}}"})


def test_multitask_mixes_rows_by_weight_and_checks_every_task_file(tmp_path):
    from mlflow_finetune_plugin.data.splits import load_splits

    project = _multitask_project(tmp_path, weights=(6, 1, 1))
    recipe = load_recipe(project, overrides={"multitask.stopping": "first_exhausted"})
    data = load_splits(recipe)
    mixed, evals, fmt = data.train, data.task_evals, data.fmt
    assert fmt == "alpaca+chat+prompt_completion"
    assert set(evals) == {"qa", "label", "extract"} and len(evals["qa"]) == 2 and len(evals["label"]) == 2
    # Which task each row came from, by its content: the heavy task dominates the mixture.
    users = [row["messages"][0]["content"] for row in mixed]
    counts = Counter("qa" if u.startswith("What is") else "label" if u.startswith("Label") else "extract"
                     for u in users)
    assert counts["qa"] > counts["label"] + counts["extract"], counts
    assert [r["messages"] for r in load_splits(recipe).train] == [r["messages"] for r in mixed]  # seeded

    # A broken line in any task is reported by file and line before anything starts.
    (project / "data"
     / "label.jsonl").write_text('{"instruction": "x", "input": "y", "output": "z"}\n{oops\n')
    with pytest.raises(FinetuneError, match=r"label\.jsonl:2"):
        check_recipe_data(load_recipe(project), check_data)


def test_a_multitask_task_can_be_sharegpt(tmp_path):
    from mlflow_finetune_plugin.data.splits import load_splits

    project = _multitask_project(tmp_path)
    jsonl(project / "data" / "label.jsonl", [{"conversations": [{"from": "human", "value": f"Label item {i}"},
                                                                 {"from": "gpt", "value": f"L{i % 3}"}]}
                                              for i in range(8)])
    check_recipe_data(load_recipe(project), check_data)
    data = load_splits(load_recipe(project))
    mixed, fmt = data.train, data.fmt
    assert "sharegpt" in fmt.split("+")
    assert {"role": "assistant", "content": "L1"} in [m for row in mixed for m in row["messages"]]


def test_multitask_trains_one_adapter_and_logs_per_task_metrics(tmp_path, tracking_uri):
    recipe = load_recipe(_multitask_project(tmp_path / "mt"), overrides=FAST)
    assert run(recipe) == 0
    r = _finished_run("mt")
    metrics = r.data.metrics
    for task in ("qa", "label", "extract"):
        for name in ("rougeL", "loss"):
            assert f"eval/{task}/{name}" in metrics and f"eval/{task}/base/{name}" in metrics
    # The overall numbers the promotion gates read are the mean over the tasks.
    mean = sum(metrics[f"eval/{t}/loss"] for t in ("qa", "label", "extract")) / 3
    assert metrics["eval/tuned/loss"] == pytest.approx(mean)
    inputs = {i.dataset.name: {t.key: t.value for t in i.tags} for i in r.inputs.dataset_inputs}
    assert inputs["qa"]["weight"] == "2.0" and inputs["label"]["mlflow.data.context"] == "training"
    assert r.data.tags["finetune.tasks"] == "qa:2,label:1,extract:1"
    version = mlflow.MlflowClient().get_model_version_by_alias("mt", "challenger")
    assert version.tags["finetune.method"] == "multitask"


def test_multitask_one_adapter_per_task_registers_each(tmp_path, tracking_uri):
    from peft import PeftModel

    from mlflow_finetune_plugin.logged_model import load_logged_model

    recipe = load_recipe(_multitask_project(tmp_path / "mtp"),
                         overrides={**FAST, "multitask.adapters": "per_task"})
    assert run(recipe) == 0
    r = _finished_run("mtp")
    client = mlflow.MlflowClient()
    adapters = {}
    for task in ("qa", "label", "extract"):
        assert f"train/{task}/loss" in r.data.metrics and f"eval/{task}/rougeL" in r.data.metrics
        version = client.get_model_version_by_alias(f"mtp-{task}", "challenger")
        assert version.tags["finetune.task"] == task
        local = Path(mlflow.artifacts.download_artifacts(f"models:/mtp-{task}@challenger"))
        assert (local / "artifacts" / "adapter" / "adapter_config.json").exists()  # a plain adapter folder
        loaded = load_logged_model(local)
        assert isinstance(loaded.model, PeftModel)
        adapters[task] = {k: v.clone() for k, v in loaded.model.state_dict().items() if "lora_" in k}
    # Three different adapters, each trained on its own task only.
    qa, label = adapters["qa"], adapters["label"]
    assert set(qa) == set(label) and any(not torch.equal(qa[k], label[k]) for k in qa)


# ---------------------------------------------------------------- dpo


def test_dpo_refuses_non_preference_data_and_sft_refuses_preference_data(tmp_path):
    jsonl(tmp_path / "data" / "train.jsonl", chat_rows(4))
    (tmp_path / "finetune.yaml").write_text("method: dpo\n")
    with pytest.raises(FinetuneError, match=r"is chat data, but the `dpo` method trains on preference rows"):
        check_recipe_data(load_recipe(tmp_path), check_data)
    jsonl(tmp_path / "data" / "train.jsonl", _pref_rows(4))
    with pytest.raises(FinetuneError, match=r"preference data, but the `lora` method.*Use the `dpo` method"):
        check_recipe_data(load_recipe(tmp_path, method="lora"), check_data)
    check_recipe_data(load_recipe(tmp_path), check_data)  # and dpo takes it


def _dpo_project(root: Path, extra: str = "") -> Path:
    jsonl(root / "data" / "train.jsonl", _pref_rows(8))
    jsonl(root / "data" / "eval.jsonl", _pref_rows(2, 40))
    (root
     / "finetune.yaml").write_text(f"method: dpo\ndata: {{eval: data/eval.jsonl, max_length: 64}}\n{extra}")
    return root


def test_dpo_trains_a_fresh_adapter_against_the_base(tmp_path, tracking_uri):
    recipe = load_recipe(_dpo_project(tmp_path / "prefs"), overrides={**FAST, "train.learning_rate": 5e-3})
    assert run(recipe) == 0
    r = _finished_run("prefs")
    assert "eval/tuned/rewards/accuracies" in r.data.metrics and "train/loss" in r.data.metrics
    assert "eval/base/rougeL" in r.data.metrics and "eval/tuned/rougeL" in r.data.metrics
    local = Path(mlflow.artifacts.download_artifacts("models:/prefs@challenger"))
    assert (local / "artifacts" / "adapter" / "adapter_config.json").exists()
    loaded = mlflow.pyfunc.load_model("models:/prefs@challenger")
    answer = loaded.predict([{"messages": [{"role": "user", "content": "What is 3 plus 3?"}]}],
                            params={"max_new_tokens": 4})
    assert isinstance(answer[0], str)


def _register_sft_adapter(tiny_model_dir) -> None:
    """Version 1 of `sft`: a LoRA adapter on the tiny model with random (non-zero) weights, unlike the
    base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlflow_finetune_plugin.logged_model import log_finetuned_model
    from mlflow_finetune_plugin.models.tiny import TINY_MODEL_REF

    torch.manual_seed(0)
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with mlflow.start_run():
        info = log_finetuned_model(sft, AutoTokenizer.from_pretrained(tiny_model_dir),
                                   {"base_model": TINY_MODEL_REF, "artifact": "adapter", "method": "lora"})
    mlflow.register_model(info.model_uri, "sft")


def _yes_no_rows(n: int, offset: int = 0) -> list[dict]:
    """An easy preference to learn: the same chosen and the same rejected answer whatever the question. The
    chosen answer is the longer one, so its summed log-prob starts out below the rejected one's."""
    return [{"prompt": [{"role": "user", "content": f"Can I export note {i}?"}],
             "chosen": [{"role": "assistant",
                         "content": "Yes: open the note, then choose Export in its menu."}],
             "rejected": [{"role": "assistant", "content": "No idea."}]} for i in range(offset, offset + n)]


def test_dpo_logs_the_held_out_preference_margin_of_the_start_and_the_tuned_policy(tmp_path, tracking_uri):
    root = tmp_path / "margin"
    jsonl(root / "data" / "train.jsonl", _yes_no_rows(16))
    jsonl(root / "data" / "eval.jsonl", _yes_no_rows(4, 40))
    (root / "finetune.yaml").write_text("method: dpo\ndata: {eval: data/eval.jsonl, max_length: 64}\n")
    # TRL evaluates after the last step, on the 4 held-out pairs in one batch: its log-probs are comparable.
    recipe = load_recipe(root, overrides={**FAST, "train.max_steps": 6, "train.save_steps": 6,
                                          "train.batch_size": 4, "train.learning_rate": 5e-3})
    assert run(recipe) == 0
    m = _finished_run("margin").data.metrics
    for policy in ("start", "tuned"):
        assert f"eval/{policy}/pref_margin" in m and f"eval/{policy}/pref_accuracy" in m
    assert m["eval/n_pairs"] == 4
    assert m["eval/tuned/pref_margin"] > m["eval/start/pref_margin"]
    assert m["eval/tuned/pref_accuracy"] >= m["eval/start/pref_accuracy"]
    assert m["eval/start/pref_accuracy"] < 1  # room to rise: the check above is not trivially true
    # Scored on the tokens TRL trains on: its mean chosen minus mean rejected log-prob of the same batch.
    assert m["eval/tuned/pref_margin"] == pytest.approx(
        m["eval/tuned/logps/chosen"] - m["eval/tuned/logps/rejected"], rel=1e-3, abs=1e-3)
    assert "eval/base/rougeL" in m and "eval/tuned/rewards/accuracies" in m  # the other evaluations still run


def test_dpo_continues_a_registered_adapter_from_its_start_and_logs_only_it(tmp_path, tracking_uri,
                                                                            tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mlflow_finetune_plugin.data.read import load_training_dataset
    from mlflow_finetune_plugin.evaluate.preferences import preference_margins, preference_metrics
    from mlflow_finetune_plugin.models.base import load_tokenizer

    _register_sft_adapter(tiny_model_dir)
    adapter_dir = Path(mlflow.artifacts.download_artifacts("models:/sft/1")) / "artifacts" / "adapter"
    start = load_file(adapter_dir / "adapter_model.safetensors")
    root = _dpo_project(tmp_path / "prefs3")
    assert run(load_recipe(root, overrides={**FAST, "dpo.init_adapter": "models:/sft/1"})) == 0
    version = mlflow.MlflowClient().get_model_version_by_alias("prefs3", "challenger")
    logged = mlflow.MlflowClient().get_run(version.run_id).data.metrics
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter_dir))
    pairs = list(load_training_dataset(str(root / "data" / "eval.jsonl"), "preference")[0])
    expected = preference_metrics(preference_margins(sft, load_tokenizer(), pairs, 64), "start")
    assert logged["eval/start/pref_margin"] == pytest.approx(expected["eval/start/pref_margin"], rel=1e-4,
                                                             abs=1e-4)
    assert logged["eval/start/pref_accuracy"] == expected["eval/start/pref_accuracy"]
    with sft.disable_adapter():  # the start is the registered adapter, not the base
        base = preference_margins(sft, load_tokenizer(), pairs, 64)
    assert base != pytest.approx(preference_margins(sft, load_tokenizer(), pairs, 64), abs=1e-3)
    final_dir = (
        Path(mlflow.artifacts.download_artifacts("models:/prefs3@challenger")) / "artifacts" / "adapter"
    )
    assert not (final_dir / "start").exists(), "the start's frozen copy must not be logged"
    assert not (final_dir / "ref").exists(), "TRL's frozen reference copy must not be logged"
    final = load_file(final_dir / "adapter_model.safetensors")
    assert set(final) == set(start)  # it continued the same adapter (q_proj/v_proj, r=8), not a fresh one
    assert any(not torch.equal(final[k], start[k]) for k in start)  # and it trained


def _logp_one_at_a_time(model, tokenizer, prompt: list[dict], answer: list[dict]) -> float:
    """log p(answer | prompt) by hand: one unpadded sequence, the answer's tokens after the templated
    prompt."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    ids = tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return sum(float(logps[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids)))


def test_preference_margins_of_padded_batches_equal_the_hand_computation(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from mlflow_finetune_plugin.evaluate.preferences import preference_margins, preference_metrics
    from mlflow_finetune_plugin.models.base import load_tokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir), load_tokenizer()
    # answers of different lengths: padded batches
    rows = _pref_rows(3) + _pref_rows(2, 998) + _yes_no_rows(1)
    by_hand = [_logp_one_at_a_time(model, tokenizer, r["prompt"], r["chosen"])
               - _logp_one_at_a_time(model, tokenizer, r["prompt"], r["rejected"]) for r in rows]
    # a full and a partial batch
    batched = preference_margins(model, tokenizer, rows, max_length=64, batch_size=4)
    assert batched == pytest.approx(by_hand, rel=1e-4, abs=1e-4)
    assert preference_margins(model, tokenizer, rows, max_length=64, batch_size=1) == pytest.approx(by_hand,
                                                                                                    abs=1e-4)
    metrics = preference_metrics(batched, "tuned")
    assert metrics["eval/tuned/pref_margin"] == pytest.approx(sum(by_hand) / len(rows), abs=1e-4)
    assert metrics["eval/tuned/pref_accuracy"] == sum(m > 0 for m in by_hand) / len(rows)


def test_init_adapter_errors_name_the_key(tmp_path, tracking_uri):
    from mlflow_finetune_plugin.train.adapters import resolve_adapter

    with pytest.raises(FinetuneError, match="model.init_adapter: cannot resolve"):
        resolve_adapter("models:/nothing-here/1")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FinetuneError, match="not a LoRA adapter"):
        resolve_adapter(str(tmp_path / "folder"))


def test_bundled_multitask_and_dpo_recipes_validate_with_their_data():
    for name, method in (("multitask", "multitask"), ("dpo", "dpo")):
        recipe = load_recipe(REPO / "recipes" / name)
        assert recipe.method == method
        check_recipe_data(recipe, check_data)
    assert len(load_recipe(REPO / "recipes" / "multitask").data.tasks) >= 3


# ---------------------------------------------------------------- packing


def test_packing_auto_is_on_where_exact_and_fast_and_packed_rows_do_not_see_each_other(tmp_path,
                                                                                       tiny_model_dir):
    from transformers import AutoModelForCausalLM

    jsonl(tmp_path / "data" / "train.jsonl", chat_rows(4))
    flash = {"model.attn_implementation": "flash_attention_2"}
    assert packing(load_recipe(tmp_path, overrides=flash)) is True
    # sdpa: exact, pays on some data only (docs/benchmarks-history.md 1b)
    assert packing(load_recipe(tmp_path)) is False
    assert packing(load_recipe(tmp_path, method="prefix", overrides=flash)) is False
    assert packing(load_recipe(tmp_path, method="prompt", overrides=flash)) is False
    assert packing(load_recipe(tmp_path, overrides={**flash, "model.trust_remote_code": True})) is False
    assert packing(load_recipe(tmp_path, overrides={**flash, "data.packing": False})) is False
    assert packing(load_recipe(tmp_path, overrides={"data.packing": True})) is True

    # The safety claim itself: two rows packed into one sequence (positions restarting, no attention mask, as
    # TRL's padding-free collator sends them) give each row's own logits.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    a, b = torch.randint(5, 400, (1, 9)), torch.randint(5, 400, (1, 6))
    with torch.no_grad():
        alone_a, alone_b = model(a, use_cache=False).logits, model(b, use_cache=False).logits
        packed = model(input_ids=torch.cat([a, b], 1), use_cache=False,
                       position_ids=torch.cat([torch.arange(9), torch.arange(6)])[None]).logits
    assert torch.allclose(packed[:, :9], alone_a, atol=1e-5) and torch.allclose(packed[:, 9:], alone_b,
                                                                                atol=1e-5)


def test_packed_training_runs_with_fewer_sequences(tmp_path, tiny_model_dir):
    trainer = _sft_trainer(tmp_path, chat_rows(12), **{"data.packing": True})
    assert len(trainer.train_dataset) < 12  # rows were packed together
    assert "position_ids" in trainer.data_collator([trainer.train_dataset[0]])
    trainer.train()


def _sft_trainer(tmp_path, rows, **overrides):
    from mlflow_finetune_plugin.data.splits import load_splits
    from mlflow_finetune_plugin.models.base import load_base_model, load_tokenizer
    from mlflow_finetune_plugin.train.adapters import attach
    from mlflow_finetune_plugin.train.objectives import sft
    from mlflow_finetune_plugin.train.trainers import training_arguments

    jsonl(tmp_path / "data" / "train.jsonl", rows)
    recipe = load_recipe(tmp_path, overrides={"data.max_length": 128, "train.max_steps": 1,
                                              "eval.enabled": False, **overrides})
    train_ds = load_splits(recipe).train
    args = training_arguments(recipe, "sft-test", None)
    args["output_dir"] = str(tmp_path / "out")
    torch.manual_seed(0)
    model = attach(load_base_model(recipe.model), recipe)
    # no MLflow run
    return sft.build_trainer(recipe, model, load_tokenizer(), train_ds, None, args, callbacks=[])


@pytest.mark.parametrize("fused", [True, False, "chunked"])
def test_packed_rows_stay_rows_and_give_each_examples_own_loss(tmp_path, fused):
    """sdpa: packed examples stay in rows of max_length (not one flattened row) and the loss of a packed batch
    is the token-weighted loss of its examples run one by one; the token count is the real tokens."""
    trainer = _sft_trainer(tmp_path, chat_rows(12), **{"data.packing": True, "train.fused_lm_head": fused})
    assert trainer.pack_rows and trainer.fused_lm_head == fused
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(rows)
    n_real = sum(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (2, max(len(r["input_ids"]) for r in rows))  # two rows, not one
    assert int(batch["attention_mask"].sum()) == n_real
    assert (batch["labels"][batch["position_ids"] == 0] == -100).all()  # no label across example boundaries

    model = trainer.model.train()
    packed = trainer.compute_loss(model, dict(batch))
    assert trainer._total_train_tokens == n_real

    # The same examples unpacked, one forward each: sum of per-token losses / labelled tokens.
    total, labelled = 0.0, 0
    for i, row in enumerate(rows):
        for ids, labels in _split_packed(row, batch["labels"][i]):
            out = model(input_ids=ids[None], labels=labels[None], use_cache=False)
            n = int((labels[1:] != -100).sum())
            total, labelled = total + float(out.loss) * n, labelled + n
    assert packed.item() == pytest.approx(total / labelled, rel=1e-5)


def _split_packed(row: dict, labels: torch.Tensor):
    start = 0
    for n in row["seq_lengths"]:
        yield torch.tensor(row["input_ids"][start:start + n]), labels[start:start + n]
        start += n


def test_fused_and_plain_loss_agree_and_log_the_same_metrics(tmp_path):
    """train.fused_lm_head only changes how the loss is computed: same loss, same gradients, same token
    count."""
    results = {}
    for fused in (True, False):
        trainer = _sft_trainer(tmp_path / str(fused), chat_rows(6), **{"train.fused_lm_head": fused})
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        model = trainer.model.train()
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[fused] = loss.item(), grads, trainer._total_train_tokens, trainer._metrics["train"]
    (fl, fg, ft, fm), (pl, pg, pt, pm) = results[True], results[False]
    assert pl == pytest.approx(fl, rel=1e-5)
    assert all(torch.allclose(pg[n], fg[n], rtol=1e-4, atol=1e-6) for n in fg)
    assert pt == ft == int(batch["attention_mask"].sum())
    assert pm["mean_token_accuracy"] == pytest.approx(fm["mean_token_accuracy"])
    assert "entropy" in fm and "entropy" not in pm  # the fused head's extra metric


def test_fused_lm_head_auto_follows_the_device(tmp_path, monkeypatch):
    from mlflow_finetune_plugin.train.objectives.sft import fused_lm_head

    jsonl(tmp_path / "data" / "train.jsonl", chat_rows(2))
    recipe = load_recipe(tmp_path)
    assert fused_lm_head(recipe) == (True if torch.cuda.is_available() else "chunked")
    for value in (True, False, "chunked"):
        assert fused_lm_head(load_recipe(tmp_path, overrides={"train.fused_lm_head": value})) == value
    monkeypatch.setenv("WORLD_SIZE", "2")  # DDP refuses the chunked head's in-forward gradients
    assert fused_lm_head(recipe) == torch.cuda.is_available()
    assert fused_lm_head(load_recipe(tmp_path, overrides={"train.fused_lm_head": "chunked"})) is False


def test_plain_loss_scores_labelled_positions_only_and_matches_the_models_loss(tmp_path):
    """fused_lm_head=false: the LM head sees only positions whose next token is labelled, and the loss is
    still transformers' own (sum / num_items_in_batch as in gradient accumulation, else the mean), with equal
    gradients."""
    trainer = _sft_trainer(tmp_path, chat_rows(6), **{"train.fused_lm_head": False})
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    model = trainer.model.train()
    head = model.get_output_embeddings()
    seen = []
    probe = head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    n_labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert n_labelled < batch["labels"][:, 1:].numel()  # prompts are not labelled
    for items in (None, n_labelled + 5):
        model.zero_grad()
        seen.clear()
        torch.manual_seed(1)  # same LoRA dropout masks on both sides
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert seen == [(n_labelled, head.in_features)]
        model.zero_grad()
        kwargs = {} if items is None else {"num_items_in_batch": items}
        torch.manual_seed(1)
        reference = model(**{k: v for k, v in batch.items()}, use_cache=False, **kwargs).loss
        reference.backward()
        assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
        assert all(torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-6)
                   for n, p in model.named_parameters() if p.requires_grad)
    probe.remove()
    assert not head._forward_pre_hooks  # the restriction is removed after each step
