"""Playground votes in MLflow, their win rates and arena ratings, and preference data made from them.

Each vote is one finished run in the experiment `playground-votes`: tags say which registered model and which
two versions were compared and the verdict (searchable, and what the win rates are computed from); params hold
the generation settings; `vote.json` holds the prompt, both conversations and both answers. Images shown to
the models are logged under the run's `images/` and referred to in `vote.json` as OpenAI `image_url` parts
holding their `runs:/RUN/images/SHA256.EXT` URIs: the vote keeps them wherever the tracking server is.
`export` turns the votes with a winner into prompt/chosen/rejected rows that `mlflow-finetune data check
--format preference` and the `dpo` and `reward` entry points take, or (`--format kto`) every vote into one
thumbs-up/down row per answer, the `kto` entry point's unpaired preference data; their images are downloaded
into an `images/` folder beside the output file, and the rows refer to them by relative path (`data/images.py`
reads them from the file's folder).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.arena import ratings as arena
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.messages import text_of

EXPERIMENT = "playground-votes"
VOTE_FILE = "vote.json"   # a vote run's record: both conversations and answers
VOTE_IMAGES = "images"    # a vote run's images, and the folder beside an export that holds them
VERDICTS = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both are bad"}
# What a verdict says in the arena ratings: as in Chatbot Arena, "both bad" is a tie, half a win each way.
OUTCOMES = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}


@dataclass
class Comparison:
    """One prompt answered by two models: what a vote is about."""

    name: str                 # the registered model whose playground this is (votes are filed under it)
    model_a: str              # model choice keys: NAME/3 or NAME/3:base
    model_b: str
    context_a: list[dict]     # the messages side A answered: system prompt, earlier turns, the prompt
    context_b: list[dict]
    answer_a: str
    answer_b: str
    settings: dict
    blind: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    # the two answers' trace ids (`playground --trace`), A then B
    traces: list[str | None] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        users = [m["content"] for m in self.context_a if m.get("role") == "user"]
        return text_of(users[-1]) if users else ""


def normalize_verdict(verdict: str) -> str:
    """`a`, `b`, `tie`, `both_bad` (labels like 'A is better' or 'both bad' are accepted too)."""
    text = str(verdict).strip().lower().replace(" ", "_").replace("-", "_")
    aliases = {"a_is_better": "a", "a_better": "a", "b_is_better": "b", "b_better": "b",
               "both_are_bad": "both_bad"}
    text = aliases.get(text, text)
    if text not in VERDICTS:
        raise FinetuneError(f"unknown verdict {verdict!r}: use one of {', '.join(VERDICTS)}")
    return text


def log_vote(comparison: Comparison, verdict: str, user: str | None = None,
             experiment: str = EXPERIMENT) -> str:
    """Log one vote as a finished run; returns its run id. Thread-safe (no active-run state)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    verdict = normalize_verdict(verdict)
    c = comparison
    client = MlflowClient()
    vote_tags = {tags.VOTE_MODEL: c.name, tags.VOTE_MODEL_A: c.model_a, tags.VOTE_MODEL_B: c.model_b,
                 tags.VOTE_VERDICT: verdict, tags.VOTE_BLIND: str(c.blind).lower(),
                 tags.VOTE_COMPARISON: c.id, tags.VOTE_USER: user or "", tags.VOTE_PROMPT: c.prompt[:500]}
    from mlflow_finetune_plugin.tracking import experiment_id

    run = client.create_run(experiment_id(experiment, client), tags=vote_tags,
                            run_name=f"{c.model_a} vs {c.model_b}: {verdict}")
    run_id = run.info.run_id
    try:
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in sorted(c.settings.items())])
        logged = _with_logged_images(client, run_id, [c.context_a, c.context_b])
        record = {**asdict(c), "context_a": logged[0], "context_b": logged[1], "verdict": verdict,
                  "user": user}
        client.log_dict(run_id, record, VOTE_FILE)
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _vote_runs(name: str, experiment: str) -> Iterator:
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return
    filter_string = f"tags.`{tags.VOTE_MODEL}` = '{name}' and attributes.status = 'FINISHED'"
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        yield from page
        token = page.token
        if not token:
            return


@dataclass
class PairSummary:
    """Votes between two versions; `first`/`second` in sorted order, whichever side each was shown on."""

    first: str
    second: str
    first_wins: int = 0
    second_wins: int = 0
    ties: int = 0
    both_bad: int = 0

    @property
    def votes(self) -> int:
        return self.first_wins + self.second_wins + self.ties + self.both_bad

    @property
    def first_win_rate(self) -> float | None:
        """(wins + half the ties) / decided-or-tied votes; 'both bad' votes say nothing about which is
        better."""
        n = self.first_wins + self.second_wins + self.ties
        return (self.first_wins + 0.5 * self.ties) / n if n else None


def read_votes(name: str, experiment: str = EXPERIMENT) -> list[tuple[str, str, str]]:
    """(model A, model B, verdict) of every finished vote on `name`, oldest first."""
    votes = []
    for run in _vote_runs(name, experiment):
        on_run = run.data.tags
        a, b, verdict = on_run.get(tags.VOTE_MODEL_A), on_run.get(tags.VOTE_MODEL_B), on_run.get(
            tags.VOTE_VERDICT)
        if a and b and verdict in VERDICTS:
            votes.append((a, b, verdict))
    return votes


def summary(name: str, experiment: str = EXPERIMENT) -> list[PairSummary]:
    """Win rates per pair of compared versions of `name`, most-voted pair first."""
    return pair_summaries(read_votes(name, experiment))


def pair_summaries(votes: list[tuple[str, str, str]]) -> list[PairSummary]:
    """`read_votes` counted per pair of versions, most-voted pair first."""
    pairs: dict[tuple[str, str], PairSummary] = {}
    for a, b, verdict in votes:
        first, second = sorted((a, b))
        s = pairs.setdefault((first, second), PairSummary(first, second))
        if verdict == "tie":
            s.ties += 1
        elif verdict == "both_bad":
            s.both_bad += 1
        elif (a if verdict == "a" else b) == first:
            s.first_wins += 1
        else:
            s.second_wins += 1
    return sorted(pairs.values(), key=lambda s: (-s.votes, s.first, s.second))


SUMMARY_HEADERS = ["model", "vs", "votes", "wins", "losses", "ties", "both bad", "win rate"]


def summary_rows(name: str, experiment: str = EXPERIMENT) -> list[list]:
    """`summary` as table rows (SUMMARY_HEADERS)."""
    return [_summary_row(s) for s in summary(name, experiment)]


def _summary_row(s: PairSummary) -> list:
    return [s.first, s.second, s.votes, s.first_wins, s.second_wins, s.ties, s.both_bad,
            None if s.first_win_rate is None else round(s.first_win_rate, 4)]


def ratings(votes: list[tuple[str, str, str]], rounds: int = arena.ROUNDS, seed: int = 0,
            min_votes: int = arena.MIN_VOTES) -> arena.Leaderboard:
    """Arena ratings (Bradley-Terry, bootstrap 95% intervals) of the versions in `votes` (`read_votes`)."""
    return arena.rate([arena.Battle(a, b, OUTCOMES[v]) for a, b, v in votes], rounds, seed, min_votes)


LEADERBOARD_HEADERS = ["rank", "model", "rating", "95% interval", "votes", "note"]
PAIR_HEADERS = [*SUMMARY_HEADERS, "separated"]


def leaderboard_rows(board: arena.Leaderboard) -> list[list]:
    """The ratings as table rows (LEADERBOARD_HEADERS), best first."""
    return [[r.rank, r.model, round(r.rating), r.interval, r.votes,
             "too few votes (fewer than "
             f"{board.min_votes})" if board.too_few(r) else ""] for r in board.ratings]


def pair_rows(votes: list[tuple[str, str, str]], board: arena.Leaderboard) -> list[list]:
    """Win rates per pair (PAIR_HEADERS), each saying whether the ratings tell the two apart."""
    return [[*_summary_row(s), board.separation(s.first, s.second)[1]] for s in pair_summaries(votes)]


@dataclass
class ExportResult:
    path: Path
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    what: str = "preference pairs"

    def report(self) -> str:
        skipped = "; ".join(f"{n} {why}" for why, n in self.skipped.items())
        return f"Wrote {self.written} {self.what} to {self.path}" + (f" (skipped {skipped})" if skipped
                                                                     else "")


# --format kto: which answers of a vote are desirable (KTO's label), per verdict. A tie says both answers are
# acceptable; "both are bad" says neither is.
KTO_LABELS = {"a": (True, False), "b": (False, True), "tie": (True, True), "both_bad": (False, False)}


def export(name: str, out: str | Path, experiment: str = EXPERIMENT, fmt: str = "preference") -> ExportResult:
    """Write the votes of `name` as JSONL: `preference` (the votes with a winner, as chat-form pairs
    {"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...]}) or `kto` (every vote,
    one {"prompt", "completion", "label"} row per answer, labelled by `KTO_LABELS`; an answer given twice to
    one prompt is written once, and not at all when the votes disagree about it)."""
    if fmt not in ("preference", "kto"):
        raise FinetuneError(f"unknown export format {fmt!r}: use preference or kto")
    result = ExportResult(Path(out),
                          what="preference pairs" if fmt == "preference" else "thumbs-up/down rows")
    rows = []

    def skip(why: str) -> None:
        result.skipped[why] = result.skipped.get(why, 0) + 1

    for verdict, vote in _readable_votes(name, experiment, skip):
        if fmt == "kto":
            rows += _kto_rows(vote, verdict, skip)
            continue
        if verdict not in ("a", "b"):
            skip("ties or both-bad votes (no preference)")
            continue
        chosen, rejected = (vote["answer_a"], vote["answer_b"]) if verdict == "a" else (vote["answer_b"],
                                                                                         vote["answer_a"])
        if not chosen.strip() or not rejected.strip() or chosen.strip() == rejected.strip():
            skip("votes with an empty or identical answer")
            continue
        rows.append({"prompt": _clean(vote["context_a"]),
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    rows = _with_local_images(rows, result.path.parent, skip)
    if fmt == "kto":
        rows = _agreed(rows, skip)
    if not rows:
        total = sum(result.skipped.values())
        wanted = "a winner" if fmt == "preference" else "a readable answer"
        raise FinetuneError(
            f"no {result.what} for {name!r} in experiment {experiment!r} ({total} votes, none with "
            f"{wanted} on a shared prompt): vote in the playground first")
    result.path.parent.mkdir(parents=True, exist_ok=True)
    with open(result.path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    result.written = len(rows)
    return result


def _readable_votes(name: str, experiment: str, skip) -> Iterator[tuple[str, dict]]:
    """(verdict, vote.json) of every vote on a prompt both sides shared."""
    import mlflow

    for run in _vote_runs(name, experiment):
        verdict = run.data.tags.get(tags.VOTE_VERDICT)
        if verdict not in VERDICTS:
            continue
        try:
            vote = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{VOTE_FILE}")
        except Exception:  # noqa: BLE001 - one unreadable vote must not stop the export
            skip("votes whose vote.json could not be read")
            continue
        if _clean(vote["context_a"]) != _clean(vote["context_b"]):
            # Later turns of a conversation: each side answered its own history, so no shared prompt exists.
            skip("votes on turns whose two histories differ")
            continue
        yield verdict, vote


def _kto_rows(vote: dict, verdict: str, skip) -> list[dict]:
    prompt = _clean(vote["context_a"])
    rows = []
    for answer, label in zip((vote["answer_a"], vote["answer_b"]), KTO_LABELS[verdict]):
        if not answer.strip():
            skip("empty answers")
            continue
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": answer}],
                     "label": label})
    return rows


def _agreed(rows: list[dict], skip) -> list[dict]:
    """One row per (prompt, answer): duplicates dropped; an answer some votes call desirable and others not is
    left out (the data check would flag it as a contradiction)."""
    labels: dict[str, set] = {}
    for row in rows:
        labels.setdefault(json.dumps([row["prompt"], row["completion"]], sort_keys=True),
                          set()).add(row["label"])
    out, seen = [], set()
    for row in rows:
        key = json.dumps([row["prompt"], row["completion"]], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        if len(labels[key]) > 1:
            skip("answers the votes disagree about")
            continue
        out.append(row)
    return out


def _with_logged_images(client, run_id: str, conversations: list[list[dict]]) -> list[list[dict]]:
    """The conversations with each local image (an `image_url` part holding a file path: the playground's
    stored copies, named by content) logged under the run's VOTE_IMAGES once and referred to by its `runs:/`
    URI; data URLs and http(s) URLs stay as they are."""
    uris: dict[str, str] = {}

    def logged(url: str) -> str:
        if url not in uris:
            if _is_inline(url) or not Path(url).is_file():
                return url
            client.log_artifact(run_id, url, VOTE_IMAGES)
            uris[url] = f"runs:/{run_id}/{VOTE_IMAGES}/{Path(url).name}"
        return uris[url]

    return [_images_mapped(messages, logged) for messages in conversations]


def _with_local_images(rows: list[dict], folder: Path, skip) -> list[dict]:
    """The rows with each image of their prompt downloaded (from its vote's run; once per image) into
    `folder`/VOTE_IMAGES and referred to by its path relative to `folder`, the export's own folder: the file
    and its images move together. A row whose image cannot be fetched is left out."""
    import mlflow

    local: dict[str, str] = {}

    def fetched(url: str) -> str:
        if _is_inline(url):
            return url
        if url not in local:
            target = folder / VOTE_IMAGES
            target.mkdir(parents=True, exist_ok=True)
            if Path(url).is_file():  # a path on this machine
                path = Path(shutil.copy2(url, target / Path(url).name))
            else:
                path = Path(mlflow.artifacts.download_artifacts(artifact_uri=url, dst_path=str(target)))
            local[url] = f"{VOTE_IMAGES}/{path.name}"
        return local[url]

    out = []
    for row in rows:
        try:
            out.append({**row, "prompt": _images_mapped(row["prompt"], fetched)})
        except Exception:  # noqa: BLE001 - any store or file error: that row goes, the others stay
            skip("rows whose images could not be fetched")
    return out


def _images_mapped(messages: list[dict], fn) -> list[dict]:
    """`messages` with the URL of every OpenAI `image_url` part replaced by fn(URL)."""
    def part(p):
        if isinstance(p, dict) and p.get("type") == "image_url" and isinstance(p.get("image_url"), dict):
            return {**p, "image_url": {**p["image_url"], "url": fn(p["image_url"]["url"])}}
        return p

    return [{**m, "content": [part(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
            for m in messages]


def _is_inline(url: str) -> bool:
    """A data URL or an http(s) URL: a reference that needs no file of its own."""
    return url[:8].lower().startswith(("data:", "http://", "https://"))


def _clean(messages: list[dict]) -> list[dict]:
    """role/content only, no empty messages (an empty system prompt is no system prompt)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages
            if str(m.get("content") or "").strip()]
