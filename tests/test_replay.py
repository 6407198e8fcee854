"""Replay (`data.replay`): general text mixed into SFT against forgetting, on the tiny model.

The replayed rows carry the loss on every token and no chat template; the task's rows keep exactly the labels
they have without replay; the share is of all rows; the corpus is checked before a run exists and logged as an
input."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.data import replay
from mlflow_finetune_plugin.data.text import read_texts
from mlflow_finetune_plugin.errors import RecipeError
from mlflow_finetune_plugin.evaluate import forgetting
from tests.helpers import FAST_OVERRIDES, chat_rows, jsonl

PROSE = ["Otters float on their backs while they eat, using their chests as a table.",
         "A good loaf of bread needs flour, water, salt, yeast and, above all, time.",
         "Trains once ran on steam, and the stations smelled of coal smoke and hot oil."]


def _project(root: Path, extra: str = "") -> Path:
    jsonl(root / "data" / "train.jsonl", chat_rows(8))
    jsonl(root / "data" / "eval.jsonl", chat_rows(2, 50))
    (root / "prose.txt").write_text("\n\n".join(PROSE) + "\n")
    (root
     / "finetune.yaml").write_text("data: {train: data/train.jsonl, eval: data/eval.jsonl, max_length: 64, "
                                   "packing: false}\nregistry: {name: bot}\n" + extra)
    return root


def _trainer(recipe, tokenizer):
    from mlflow_finetune_plugin.data.splits import load_splits
    from mlflow_finetune_plugin.models.base import load_base_model
    from mlflow_finetune_plugin.train.objectives import sft
    from mlflow_finetune_plugin.train.trainers import training_arguments

    data = load_splits(recipe)
    return sft.build_trainer(recipe, load_base_model(recipe.model), tokenizer, data.train, data.eval,
                             training_arguments(recipe, "replay-test", None), [])


def _rows(trainer):
    return [(tuple(r["input_ids"]), tuple(r["labels"])) for r in trainer.train_dataset]


def test_replayed_text_is_trained_on_every_token_and_the_task_rows_keep_their_labels(tmp_path, capsys):
    from mlflow_finetune_plugin.models.base import load_tokenizer

    tokenizer = load_tokenizer(None)
    root = _project(tmp_path)
    plain = _rows(_trainer(load_recipe(root), tokenizer))
    mixed = _rows(_trainer(load_recipe(root, overrides={"data.replay": "prose.txt",
                                                        "data.replay_share": "0.2"}), tokenizer))
    assert (
        "Replay (data.replay): 2 rows of general text from prose.txt mixed into 8 training rows (20% of rows"
        in capsys.readouterr().out
    )
    # 8 task rows + round(8 x 0.2 / 0.8) = 2 replay rows; the task rows are exactly the rows (and labels) of
    # the run without replay, assistant-only: their prompts carry no loss.
    assert len(mixed) == 10
    task_rows = [row for row in mixed if row in plain]
    assert sorted(task_rows) == sorted(plain) and all(-100 in labels for _, labels in task_rows)
    replayed = [row for row in mixed if row not in plain]
    texts = {tokenizer.decode(ids) for ids, _ in replayed}
    assert texts <= {p + tokenizer.eos_token for p in PROSE} and len(replayed) == 2
    for ids, labels in replayed:  # every token of the text and its end token, no chat template around it
        assert labels == ids and "<|im_start|>" not in tokenizer.decode(ids)
    # seeded: the same recipe mixes the same rows in the same order
    again = _trainer(load_recipe(root, overrides={"data.replay": "prose.txt", "data.replay_share": "0.2"}),
                     tokenizer)
    assert _rows(again) == mixed


def test_the_share_is_of_all_rows_and_long_texts_are_cut_and_cycled(tmp_path):
    from mlflow_finetune_plugin.models.base import load_tokenizer

    assert [replay.replay_count(n, s) for n, s in [(419, 0.2), (8, 0.5), (3, 0.01)]] == [105, 8, 1]
    tokenizer = load_tokenizer(None)
    long_text = " ".join(f"word{i}" for i in range(200))
    n_ids = len(tokenizer(long_text, add_special_tokens=False)["input_ids"]) + 1  # + end of text
    pieces = -(-n_ids // 64) + 1  # the long text's pieces of at most 64 tokens, and the short text
    rows = replay.replay_rows(tokenizer, [long_text, PROSE[0]], pieces + 3, max_length=64, seed=0)
    lengths = [len(ids) for ids in rows["input_ids"]]
    assert len(rows) == pieces + 3 and max(lengths) == 64
    assert len({tuple(ids) for ids in rows["input_ids"]}) == pieces  # every piece used, then cycled
    assert rows["assistant_masks"] == [[1] * n for n in lengths]


def test_the_bundled_corpus_is_general_prose_apart_from_the_forgetting_set():
    texts = read_texts(replay.BUNDLED, "data.replay")
    measured = set(read_texts(forgetting.BUNDLED, "eval.forgetting"))
    assert len(texts) >= 60 and len(set(texts)) == len(texts) and not measured & set(texts)
    # no paragraph shares a sentence with the forgetting set: the check stays a measurement of text never
    # trained on
    sentences = {s.strip() for t in measured for s in t.split(".") if len(s.strip()) > 20}
    assert not [t for t in texts if any(s in t for s in sentences)]
    note = (replay.BUNDLED.parent / "README.md").read_text()
    assert "original text" in note and "Apache-2.0" in note


def test_replay_is_refused_before_a_run_where_it_cannot_work(tmp_path):
    root = _project(tmp_path)
    with pytest.raises(RecipeError) as err:
        load_recipe(root, overrides={"method": "dpo", "data.replay": "true"})
    assert "data.replay: replayed general text trains the language-model loss of the sft objective; dpo" \
        in str(err.value) and "Set data.replay: false" in str(err.value)
    with pytest.raises(RecipeError,
                       match=r"data.replay: file not found: missing.txt .*true for the prose bundled"):
        load_recipe(root, overrides={"data.replay": "missing.txt"})
    with pytest.raises(RecipeError, match=r"data.replay: .*\.txt / \.jsonl"):
        load_recipe(root, overrides={"data.replay": "notes.md"})
    with pytest.raises(RecipeError, match=r"data.replay_share"):
        load_recipe(root, overrides={"data.replay": "true", "data.replay_share": "1.0"})


def test_a_bad_replay_line_is_refused_by_file_and_line_before_a_run_exists(tmp_path, tracking_uri):
    from click.testing import CliRunner

    from mlflow_finetune_plugin.cli import main

    root = _project(tmp_path)
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    out = CliRunner().invoke(main, ["train", str(root), "-P", "data.replay=bad.jsonl", "-P", "model=tiny"])
    assert out.exit_code != 0
    assert 'bad.jsonl:2: expected {"text": "..."} with non-empty text (data.replay)' in out.output
    assert mlflow.search_runs(search_all_experiments=True).empty  # nothing was started


def test_a_run_with_replay_trains_and_logs_the_corpus_as_an_input(tmp_path, tracking_uri):
    from mlflow_finetune_plugin.train.job import run

    root = _project(tmp_path)
    assert run(load_recipe(root, overrides={**FAST_OVERRIDES, "data.replay": "true"})) == 0
    finished = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in finished] == ["FINISHED"]
    r = finished[0]
    inputs = {i.dataset.name: ({t.key: t.value for t in i.tags}, i.dataset) for i in r.inputs.dataset_inputs}
    tags, dataset = inputs["replay"]
    assert tags["mlflow.data.context"] == "training" and tags["format"] == "text" and tags["share"] == "0.2"
    assert "general_prose.txt" in dataset.source
    assert r.data.params["data.replay"] == "True" and "eval/forgetting/ppl_ratio" in r.data.metrics


def test_kl_replay_keeps_the_training_rows_and_pulls_towards_the_base(tmp_path, tracking_uri):
    """replay_loss kl: the training rows are those of a run without replay; each step scores one replay row;
    the KL starts at 0 (LoRA starts as the identity: tuned == base) and is logged; a full fine-tune is
    refused."""
    from mlflow_finetune_plugin.models.base import load_tokenizer
    from mlflow_finetune_plugin.train.job import run

    tokenizer = load_tokenizer(None)
    root = _project(tmp_path)
    kl = {"data.replay": "prose.txt", "data.replay_loss": "kl"}
    trainer = _trainer(load_recipe(root, overrides=kl), tokenizer)
    assert _rows(trainer) == _rows(_trainer(load_recipe(root), tokenizer))
    assert sorted(map(tuple, trainer.replay_kl)) == sorted(
        tuple(tokenizer(p, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]) for p in PROSE)

    overrides = {**FAST_OVERRIDES, **kl, "train.max_steps": 3, "train.learning_rate": 0.05}
    assert run(load_recipe(root, overrides=overrides)) == 0
    r = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    history = [m.value for m in mlflow.MlflowClient().get_metric_history(r.info.run_id, "train/replay_kl")]
    assert len(history) == 3 and history[0] == pytest.approx(0.0, abs=1e-6) and history[-1] > 1e-4

    with pytest.raises(RecipeError,
                       match="data.replay_loss: kl compares the tuned model with the base model"):
        load_recipe(root, overrides={**kl, "method": "full"})


def test_kl_replay_every_n_steps_scores_one_step_in_n_at_n_times_the_weight(tmp_path, tracking_uri, capsys):
    """data.replay_every: 2 halves the extra passes: the KL is logged on steps 1 and 3 of 4, and the printed
    weight doubles so that the average pull is that of every step. The task's own loss is logged on every
    step."""
    from mlflow_finetune_plugin.train.job import run

    root = _project(tmp_path)
    overrides = {**FAST_OVERRIDES, "data.replay": "prose.txt", "data.replay_loss": "kl",
                 "data.replay_every": 2, "train.max_steps": 4, "train.learning_rate": 0.05}
    assert run(load_recipe(root, overrides=overrides)) == 0
    assert (
        "Replay (data.replay, kl): one training step in 2 also pulls the model towards the base model on one "
        "of 3 rows of general text from prose.txt (weight 2)" in capsys.readouterr().out
    )
    r = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    history = {key: {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(r.info.run_id, key)}
               for key in ("train/replay_kl", "train/task_loss", "train/loss")}
    kl, task, loss = history.values()
    assert list(kl) == [1, 3] and kl[3] > 1e-4
    # train/loss carries the KL term at 2x on the steps that score it; train/task_loss is the loss without it
    assert list(task) == list(loss) == [1, 2, 3, 4]
    for step in (2, 4):
        assert loss[step] == pytest.approx(task[step], abs=2e-4)
    assert loss[3] == pytest.approx(task[3] + 2 * kl[3], abs=2e-4, rel=1e-3)


def test_a_recipes_replay_gives_way_where_the_entry_point_cannot_use_it(tmp_path, capsys):
    """Written in the recipe: off with a note under a preference objective, lm instead of kl for a full
    fine-tune. Asked for with -P together with such an entry point: refused."""
    root = _project(tmp_path, "method: lora\n")
    text = (root / "finetune.yaml").read_text().replace("packing: false}", "packing: false, replay: true, "
                                                                           "replay_loss: kl}")
    (root / "finetune.yaml").write_text(text)
    assert (load_recipe(root).data.replay, load_recipe(root).data.replay_loss) == (True, "kl")
    assert capsys.readouterr().err == ""
    assert load_recipe(root, method="dpo").data.replay is False
    assert "Note: data.replay is off for objective dpo" in capsys.readouterr().err
    full = load_recipe(root, method="full")
    assert (full.data.replay, full.data.replay_loss) == (True, "lm")
    assert "Note: data.replay_loss is lm for the full fine-tune" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="data.replay: replayed general text trains"):
        load_recipe(root, method="dpo", overrides={"data.replay": "true"})
    with pytest.raises(RecipeError, match="data.replay_loss: kl compares"):
        load_recipe(root, method="full", overrides={"data.replay_loss": "kl"})
