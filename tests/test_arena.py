"""Arena ratings: the Bradley-Terry math against cases with a closed form, ties, determinism and "too few
votes"; ratings from votes logged to a real sqlite MLflow store; the `arena_above` promotion gate passing and
refusing; a vote's images kept in its run and exported beside the rows."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from mlflow_finetune_plugin.arena.ratings import Battle, rate
from mlflow_finetune_plugin.arena.votes import Comparison, log_vote, ratings, read_votes
from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.registry.promotion import parse_gate, promote
from tests.helpers import MODEL_NAME, champion_version, register_eval_version


def _battles(winner: str, loser: str, wins: int, losses: int, ties: int = 0) -> list[Battle]:
    """`winner` against `loser`, shown on either side in turn (the side must not matter)."""
    outcomes = [1.0] * wins + [0.0] * losses + [0.5] * ties
    return [Battle(winner, loser, o) if i % 2 else Battle(loser, winner, 1.0 - o) for i,
            o in enumerate(outcomes)]


def test_an_80_percent_winner_is_rated_above_by_the_closed_form_gap():
    board = rate(_battles("x", "y", 80, 20))
    x, y = board.ratings
    assert (x.model, y.model) == ("x", "y") and (x.rank, y.rank) == (1, 2) and x.votes == y.votes == 100
    # Two models: the likelihood is maximal where P(x beats y) = 0.8, i.e. 400 * log10(0.8 / 0.2) points
    # apart.
    assert x.rating - y.rating == pytest.approx(400 * math.log10(4), abs=0.5)
    assert x.rating + y.rating == pytest.approx(2000, abs=1e-6)  # 1000 = their average
    assert x.lower < x.rating < x.upper and y.lower < y.rating < y.upper
    assert 20 < x.upper - x.lower < 200  # 100 votes: tens of points wide, not a point and not the whole scale
    assert board.separation("y", "x") == ("x", f"x ahead: {x.interval} above {y.interval}")
    # A chain with no direct votes between its ends: x-z is the sum of the two gaps (the model is transitive).
    chain = rate(_battles("x", "y", 80, 20) + _battles("y", "z", 80, 20))
    assert [r.model for r in chain.ratings] == ["x", "y", "z"]
    gaps = {r.model: r.rating for r in chain.ratings}
    assert gaps["x"] - gaps["z"] == pytest.approx(2 * 400 * math.log10(4), abs=1)


def test_a_tie_is_half_a_win_each_way():
    with_ties = {r.model: r.rating for r in rate(_battles("x", "y", 60, 20, ties=20)).ratings}
    as_halves = {r.model: r.rating for r in rate(_battles("x", "y", 70, 30)).ratings}
    assert with_ties == pytest.approx(as_halves, abs=1e-3)
    only_ties = rate(_battles("x", "y", 0, 0, ties=12))
    assert [round(r.rating, 6) for r in only_ties.ratings] == [1000, 1000]
    assert only_ties.separation("x", "y")[0] is None


def test_the_same_votes_and_seed_give_the_same_table():
    battles = _battles("x", "y", 30, 10) + _battles("y", "z", 25, 15)
    assert rate(battles, seed=7) == rate(battles, seed=7)
    assert rate(list(reversed(battles)), seed=7).ratings == rate(battles, seed=7).ratings  # order is no input
    other = rate(battles, seed=8)
    assert [r.rating for r in other.ratings] == [r.rating for r in rate(battles, seed=7).ratings]
    assert [r.lower for r in other.ratings] != [r.lower for r in rate(battles, seed=7).ratings]


def test_too_few_votes_to_separate_is_said_and_why():
    # 3-0: every resample is 3-0, so the intervals cannot overlap; the vote count is what says "not yet".
    board = rate(_battles("x", "y", 3, 0))
    assert board.separation("x", "y") == (None,
                                          "too few votes to separate: x has 3, y has 3 (at least 10 each "
                                          "needed)")
    # a perfect record has no finite MLE: the prior
    assert all(math.isfinite(r.rating) for r in board.ratings)
    close = rate(_battles("x", "y", 26, 24))
    who, why = close.separation("x", "y")
    assert who is None and why.startswith("too few votes to separate: 95% intervals overlap")
    x, y = close.ratings
    assert x.lower < y.upper
    assert rate([Battle("x", "x", 1.0)]).ratings == []  # a model against itself says nothing
    with pytest.raises(FinetuneError, match="at least 100 resamples"):
        rate(_battles("x", "y", 8, 2), rounds=10)


def _vote(a: str, b: str, verdict: str, name: str = MODEL_NAME) -> None:
    messages = [{"role": "user", "content": "How do I reset my password?"}]
    log_vote(Comparison(name, a, b, messages, messages, "answer of " + a, "answer of " + b,
                        {"temperature": 0.0}, blind=True), verdict)


def _votes(winner: str, loser: str, wins: int, losses: int, ties: int = 0, both_bad: int = 0) -> None:
    for i, verdict in enumerate(["w"] * wins + ["l"] * losses + ["tie"] * ties + ["both_bad"] * both_bad):
        left, right = (winner, loser) if i % 2 else (loser, winner)
        if verdict in ("w", "l"):
            verdict = "a" if (left == winner) == (verdict == "w") else "b"
        _vote(left, right, verdict)


def test_votes_summary_rates_the_votes_logged_to_mlflow(tracking_uri):
    _votes("bot/2", "bot/1", 7, 1, ties=1, both_bad=1)
    _votes("bot/1", "bot/1:base", 3, 1)
    _vote("bot/9", "bot/2", "a", name="other-model")  # filed under another model: not in bot's table
    votes = read_votes(MODEL_NAME)
    assert len(votes) == 14
    board = ratings(votes)
    # The ratings of the logged votes are those of the same battles given directly ("both bad" = a tie).
    direct = rate(_battles("bot/2", "bot/1", 7, 1, ties=2) + _battles("bot/1", "bot/1:base", 3, 1))
    assert {r.model: round(r.rating, 3) for r in board.ratings} == {r.model: round(r.rating, 3)
                                                                    for r in direct.ratings}
    assert [r.model for r in board.ratings] == ["bot/2", "bot/1", "bot/1:base"]

    out = CliRunner().invoke(main, ["votes", "summary", MODEL_NAME])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    top = next(line for line in lines if line.startswith("1 "))
    assert (
        "bot/2" in top and f"{round(board.get('bot/2').rating)}" in top and board.get("bot/2").interval in top
    )
    base = next(line for line in lines if " bot/1:base " in f" {line} " and line[:1].isdigit())
    assert base.split()[5] == "4" and "too few votes (fewer than 10)" in base
    pair = next(line for line in lines if line.startswith("bot/1 ") and " bot/2 " in line)
    # 10 votes behind the pair: 1 win, 7 losses, 1 tie, 1 both bad; win rate (1 + 0.5) / 9.
    assert pair.split()[2:8] == ["10", "1", "7", "1", "1", "0.1667"]
    assert pair.endswith(board.separation("bot/1", "bot/2")[1])
    few = next(line for line in lines if line.startswith("bot/1 ") and "bot/1:base" in line)
    assert "too few votes to separate: bot/1:base has 4 (at least 10 each needed)" in few
    assert "No votes on 'nobody'" in CliRunner().invoke(main, ["votes", "summary", "nobody"]).output


ARENA = [parse_gate("arena_above:champion")]


def test_the_arena_gate_refuses_on_too_few_votes_and_passes_when_the_intervals_part(tracking_uri):
    recipe = {"registry": {"promote_if": [{"metric": "arena_above", "beats": ["champion"]}]}}
    v1, v2 = register_eval_version({}), register_eval_version({}, recipe=recipe)
    assert promote(MODEL_NAME, v1, "champion", ARENA).promoted  # nobody holds @champion yet
    _votes("bot/2", "bot/1", 5, 1)
    result = promote(MODEL_NAME, v2)  # the gates of v2's recipe
    assert not result.promoted and champion_version() == v1
    assert "too few votes to separate: bot/2 has 6, bot/1 has 6 (at least 10 each needed)" in result.report()
    _votes("bot/2", "bot/1", 4, 0)  # 9 of 10
    board = ratings(read_votes(MODEL_NAME))
    v2_rating, v1_rating = board.get("bot/2"), board.get("bot/1")
    assert v2_rating.lower > v1_rating.upper
    # Against its base model (never voted on) and by a margin the gap does not reach: both fail, saying why.
    short = promote(MODEL_NAME, v2, "champion", [parse_gate("arena_above:base,champion:1000")])
    assert not short.promoted and [(c.against, c.passed) for c in short.checks] == [("base", False),
                                                                                    ("champion", False)]
    assert "bot/2:base has 0" in short.checks[0].note and "by only" in short.checks[1].note
    # the recipe's gate again, now passing
    out = CliRunner().invoke(main, ["promote", MODEL_NAME, "--version", v2])
    assert out.exit_code == 0, out.output
    assert (f"{v2_rating.interval} above bot/1's "
            f"{v1_rating.interval}") in out.output and champion_version() == v2
    assert MlflowClient().get_model_version(MODEL_NAME, v2).tags["finetune.promoted_alias"] == "champion"
    # The other way round the gate fails: v1 is rated below, and the table says so.
    back = promote(MODEL_NAME, v1, "champion", ARENA)
    assert not back.promoted and "bot/2 ahead" in back.report()
    with pytest.raises(FinetuneError, match="no votes are cast on few-shot prompts"):
        promote(MODEL_NAME, v1, "champion", [parse_gate("arena_above:fewshot")])
    with pytest.raises(FinetuneError, match="expected arena_above:BEATS"):
        parse_gate("arena_above")


def test_a_vote_keeps_its_images_and_the_export_brings_them_beside_the_rows(tracking_uri, tmp_path):
    """A vote logs the images its prompt showed to its own run; `export` downloads them next to the JSONL (the
    playground's copy is gone by then) and leaves out a row whose image cannot be fetched."""
    import json

    from PIL import Image

    from mlflow_finetune_plugin.arena.votes import VOTE_FILE, export

    image = tmp_path / "red.png"
    Image.new("RGB", (8, 8), "red").save(image)

    def asked(url: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What colour is it?"}]}]

    log_vote(Comparison(MODEL_NAME, "bot/1", "bot/1:base", asked(str(image)), asked(str(image)), "red",
                        "blue", {}), "a")
    log_vote(Comparison(MODEL_NAME, "bot/1", "bot/1:base", asked("runs:/0123abcd/images/gone.png"),
                        asked("runs:/0123abcd/images/gone.png"), "red", "blue", {}), "a")
    run = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("playground-votes").experiment_id],
        order_by=["attributes.start_time ASC"])[0]
    assert run.data.tags["finetune.vote.prompt"] == "What colour is it?"
    logged = json.loads(open(MlflowClient().download_artifacts(run.info.run_id, VOTE_FILE,
                                                               str(tmp_path))).read())
    assert logged["context_a"] == asked(f"runs:/{run.info.run_id}/images/red.png")
    image_bytes = image.read_bytes()
    image.unlink()  # the playground's copy is gone: the export reads the vote's own

    result = export(MODEL_NAME, tmp_path / "out" / "prefs.jsonl")
    assert result.written == 1 and result.skipped == {"rows whose images could not be fetched": 1}
    (row,) = [json.loads(line) for line in (tmp_path / "out" / "prefs.jsonl").read_text().splitlines()]
    assert row["prompt"] == asked("images/red.png")
    assert (tmp_path / "out" / "images" / "red.png").read_bytes() == image_bytes
