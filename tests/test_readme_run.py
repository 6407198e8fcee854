"""README command 1's block is what the command printed: made by `bench/readme_run.py write` from the recorded
runs (docs/readme_run.json), never pasted by hand. tests/test_integration.py checks that the record's parser
finds the table and verdict in a real `mlflow run`'s output."""

from __future__ import annotations

import json

from bench import readme_run


def test_the_readme_block_is_what_the_recorded_runs_printed():
    record = json.loads(readme_run.RECORD.read_text())
    block = readme_run.readme_block(readme_run.README.read_text())
    assert block is not None, f"README.md lost its {readme_run.BEGIN!r} ... {readme_run.END!r} markers"
    assert block == readme_run.render(record), (
        "README.md's command-1 block differs from the recorded runs: run `python bench/readme_run.py record` "
        "(or `write`, to redo only the README from docs/readme_run.json)")


def test_the_record_holds_the_command_and_three_seeds_whose_tables_are_their_figures():
    record = json.loads(readme_run.RECORD.read_text())
    assert record["command"] == "mlflow run recipes/support-bot -e lora --backend finetune"
    assert [r["seed"] for r in record["runs"]][0] == 42 and len({r["seed"] for r in record["runs"]}) >= 3
    for run in record["runs"]:  # each printed table shows the figures its run logged: nothing edited
        cells = readme_run.table_cells(run["printed"])
        assert {key: cells[tuple(key.split("/")[:0:-1])] for key in run["figures"]} == {
            key: f"{value:.4f}" for key, value in run["figures"].items()}
        assert "eval/optimized/rougeL" in run["figures"] and "eval/tuned/rougeL" in run["figures"]
        assert "\n\nVerdict: " in run["printed"]
