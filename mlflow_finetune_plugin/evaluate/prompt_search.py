"""The `optimized` contender: the prompt a user who optimizes prompts would ship, found without touching the
held-out rows. Candidates are an instruction (none, ones written from the rows' own figures, ones a stronger
model proposed: `proposer.py`) crossed with a shot set (none, the nearest train conversations per question,
random sets of `eval.fewshot_k`); each is scored on a dev split carved from the TRAIN rows (those rows are
never shots), answering through the same batched generation (`answering.answer_all`) and metric as every other
contender. The best on the dev rows then answers the held-out rows like any contender.

A few dev rows are noisy, so the choice follows the one-standard-error rule of model selection: the simplest
candidate (the earliest: no shots, then random sets, then retrieved shots) whose dev score is within one
standard error of the best one's, the error of the mean paired difference over the dev rows; an instruction
replaces the shot set only when it gains more than that. (On gemma3's support bot a plain "higher mean" took
an instruction that was +0.02 on 8 dev rows and -0.05 on the 30 held-out ones: docs/benchmarks-history.md,
3c.) Fixed shots count as simpler than retrieved ones (one prompt for every request, whose start batches
share; no index to keep): on recipes/order-ids both scored 1.0 on the dev rows, which share the train rows'
sentence templates, and on the held-out rows' unseen templates the retrieved shots scored 0.68 against random
shots' 0.98.

The cost is bounded: at most `eval.optimize.budget` x the held-out rows answers (1.0: one more contender
pass), so budget x held-out rows / dev rows candidates. The search is a coordinate search, as DSPy's
optimizers walk it: shot sets first with the rows' own prompt, then instructions over the best shot set. It is
written here rather than run through DSPy's `Evaluate` or `mlflow.genai.optimize_prompts` because those call
the model one row at a time through their own adapters, while every contender here answers in left-padded
batches that share the prompts' common start (docs/methods.md, "The optimized prompt", says which parts are
whose).
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field

from mlflow_finetune_plugin.evaluate.answering import answer_all
from mlflow_finetune_plugin.evaluate.retrieval import nearest_shots, user_text
from mlflow_finetune_plugin.evaluate.shots import fit, shots_for_model
from mlflow_finetune_plugin.messages import fewshot_prompt, split_conversation, with_instruction
from mlflow_finetune_plugin.metrics import score

MIN_DEV_ROWS = 4  # fewer dev rows than this cannot tell two prompts apart
# a gain of exactly one standard error (one row of n better by d: mean d/n, error d/n) is within it
EPS = 1e-9
SEED = 0


@dataclass
class Candidate:
    """One prompt to try: an instruction added to the system message (None: the rows' own) and its shots:
    none, a
    fixed set, or the train conversations nearest each question (`retrieved`)."""

    label: str
    instruction: str | None = None
    shots: list[list[dict]] = field(default_factory=list)
    retrieved: bool = False

    def prompts(self, questions: list[list[dict]], train: list[list[dict]], k: int, tokenizer,
                limit: int) -> list[list[dict]]:
        """The held-out (or dev) `questions` as this candidate asks them, shots drawn from `train`."""
        shot_sets = nearest_shots(train, questions, k) if self.retrieved else [self.shots] * len(questions)
        # a VLM taking one image: the shots' text only
        _, shot_sets = shots_for_model(tokenizer, [], shot_sets)
        out = []
        for question, shots in zip(questions, shot_sets):
            asked = with_instruction(question, self.instruction)
            out.append(fit(tokenizer, fewshot_prompt(asked, shots), asked, shots, limit))
        return out

    def as_dict(self) -> dict:
        return {"label": self.label, "instruction": self.instruction, "shots": self.shots,
                "retrieved_shots": self.retrieved}


@dataclass
class Search:
    """What the search did: the winner (None when skipped, with the reason), every candidate's dev score."""

    winner: Candidate | None
    reason: str
    scores: list[tuple[str, float]] = field(default_factory=list)
    dev_rows: int = 0
    answers: int = 0
    seconds: float = 0.0
    pool: list[list[dict]] = field(default_factory=list)  # a retrieved-shot winner's: the rows it draws from
    k: int = 0                                            # and how many per question


def dev_split(train: list[list[dict]], dev_rows: int) -> tuple[list[list[dict]], list[list[dict]]] | str:
    """(pool, dev): seeded, dev at most half the scorable train rows; or why there are too few rows for
    one."""
    usable = [conv for conv in train if (pair := split_conversation(conv)) and pair[0]]
    n = min(dev_rows, len(usable) // 2)
    if n < MIN_DEV_ROWS:
        return (
            f"too few train rows for a dev split: {len(usable)} with an answer, at least {2 * MIN_DEV_ROWS} "
            f"needed ({MIN_DEV_ROWS} to score prompts on, as many to draw shots from)")
    order = random.Random(SEED).sample(range(len(usable)), len(usable))
    return [usable[i] for i in sorted(order[n:])], [usable[i] for i in sorted(order[:n])]


def row_instructions(train: list[list[dict]]) -> list[str]:
    """Instructions written from the rows themselves (no proposer): the answers' typical length, and JSON
    where the answers are JSON."""
    import json

    answers = [ref for conv in train if (pair := split_conversation(conv)) and (ref := pair[1])]
    if not answers:
        return []
    words = int(statistics.median(len(a.split()) for a in answers))
    out = [f"Answer directly, in the same style as the earlier answers, in about {max(words, 1)} words."]

    def parses(text):
        try:
            json.loads(text)
            return True
        except ValueError:
            return False

    if sum(parses(a) for a in answers) * 2 > len(answers):
        out.append("Reply with JSON only, shaped like the earlier answers.")
    return out


def candidates(pool: list[list[dict]], k: int, k_retrieved: int, shot_sets: int,
               instructions: list[str]) -> tuple[list[Candidate], list[Candidate]]:
    """(shot candidates, instruction candidates), simplest first: no shots, `shot_sets` random sets of k from
    the pool, the retrieved shots; the instructions, in order (they take the chosen shots once those are
    known)."""
    shots = [Candidate("no shots")]
    rng = random.Random(SEED)
    for i in range(shot_sets if k > 0 and len(pool) >= k else 0):
        shots.append(Candidate(f"random shots {i + 1}", shots=rng.sample(pool, k)))
    if k_retrieved > 0:  # last: a retrieval step per question is less simple than one fixed prompt
        shots.append(Candidate(f"{k_retrieved} retrieved shots", retrieved=True))
    return shots, [Candidate(f"instruction {i + 1}", instruction=text) for i, text in enumerate(instructions)]


def fitted(shots: list[Candidate], instructions: list[Candidate], budget: int) -> tuple[list, list]:
    """The candidates that fit `budget` (how many can be scored): instructions keep at least one place; of the
    shot sets, no shots and the retrieved shots come before the random sets (kept in their simplest-first
    order)."""
    n_instructions = min(len(instructions), max(1 if instructions else 0, budget // 2))
    n_shots = min(len(shots), budget - n_instructions)
    n_instructions = min(len(instructions), budget - n_shots)
    kept = sorted(shots, key=lambda c: bool(c.shots))[:n_shots]  # stable: no shots, retrieved, random sets
    return [c for c in shots if c in kept], instructions[:n_instructions]


def search(model_context, tokenizer, train: list[list[dict]], n_heldout: int, cfg, limit: int,
           instructions, seconds_per_answer: float | None = None, cache=None) -> Search:
    """Score the candidates that fit the budget on a dev split of `train` with the base model
    (`model_context`: a callable giving a fresh context for it), and return the best; skipped, with the
    reason, when the rows or the budget do not allow a search. `instructions`: a list, or a callable given the
    train rows outside the dev split (asked only once the budget fits a search: a proposer is not called for
    nothing). Prints the estimate first, then one progress bar. `cache`: the base model's answers of earlier
    runs (`answer_cache.py`), if kept."""
    from tqdm.auto import tqdm

    opt, k = cfg.optimize, cfg.fewshot_k
    k_retrieved = cfg.fewshot_k if cfg.retrieval_k is None else cfg.retrieval_k
    split = dev_split(train, opt.dev_rows)
    if isinstance(split, str):
        return Search(None, split)
    pool, dev = split
    fits = int(opt.budget * n_heldout) // len(dev)
    if callable(instructions):
        instructions = instructions(pool) if fits >= 2 else []
    shots, told = candidates(pool, k, k_retrieved, opt.shot_sets, instructions)
    shots, told = fitted(shots, told, fits)
    if len(shots) + len(told) < 2:
        return Search(None, f"the budget fits {_count(fits, 'candidate')} (eval.optimize.budget "
                            f"{opt.budget:g} x {n_heldout} held-out rows / {len(dev)} dev rows); 2 are "
                            "needed to search: raise eval.optimize.budget", dev_rows=len(dev))
    total = (len(shots) + len(told)) * len(dev)
    when = f", about {total * seconds_per_answer:.1f} s at the contenders' pace" if seconds_per_answer else ""
    print(
        f"Prompt search: {_count(len(shots), 'shot set')} then {_count(len(told), 'instruction')} x "
        f"{len(dev)} dev rows from train = {total} answers ({total / max(n_heldout, 1):.2f} of one contender "
        f"pass){when}.")
    questions, references = zip(*(split_conversation(conv) for conv in dev))
    questions, references = list(questions), list(references)
    scores: list[tuple[str, float]] = []
    per_row: dict[str, list[float]] = {}
    spent = 0.0

    def scored(candidate: Candidate) -> list[float]:
        nonlocal spent
        prompts = candidate.prompts(questions, pool, k_retrieved, tokenizer, limit)
        with model_context() as model:
            answers, _, _, seconds = answer_all(model, tokenizer, prompts, references, cfg, candidate.label,
                                                progress=progress, cache=cache)
        spent += sum(seconds)
        per_row[candidate.label] = [float(v) for v in score(answers, references)[1][opt.metric]]
        scores.append((candidate.label, statistics.fmean(per_row[candidate.label])))
        return per_row[candidate.label]

    with tqdm(total=total, desc="prompt search", unit="answer") as progress:
        for candidate in shots:
            scored(candidate)
        top = max(shots, key=lambda c: (dict(scores)[c.label], -shots.index(c)))
        # within 1 SE of top
        best = next(c for c in shots if gain(per_row[c.label], per_row[top.label]) <= EPS)
        tried = [Candidate(c.label + f" + {best.label}", c.instruction, best.shots, best.retrieved)
                 for c in told]
        for candidate in tried:
            if gain(per_row[best.label], scored(candidate)) > EPS:
                best = candidate
    kept = "" if best is top or best in tried else f"; {top.label} scored higher, within one standard error"
    return Search(best, f"best of {len(scores)} on {len(dev)} dev rows: {best.label} ({opt.metric} "
                        f"{dict(scores)[best.label]:.3f}{kept})", scores, len(dev), total, spent)


def gain(old: list[float], new: list[float]) -> float:
    """How far `new` beats `old` beyond one standard error of their mean paired difference over the same rows
    (positive: beyond it; 0 or below: within it, or worse)."""
    diffs = [b - a for a, b in zip(old, new)]
    error = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
    return statistics.fmean(diffs) - error if diffs else 0.0


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' * (n != 1)}"


def instruction_sources(train: list[list[dict]], cfg, proposer) -> list[str]:
    """The instructions to try, in order: a proposer's (`proposer.Proposer`, or None) where one answers, then
    the rows' own."""
    rows = row_instructions(train)
    if proposer is None or cfg.optimize.instructions == 0:
        return rows
    from mlflow_finetune_plugin.evaluate.proposer import propose

    return propose(proposer, train, cfg.optimize.instructions) + rows


def describe(candidate: Candidate) -> str:
    """The winning prompt in a line, for the run's log."""
    parts = [f"instruction {candidate.instruction!r}" if candidate.instruction
             else "the rows' own system prompt"]
    if candidate.retrieved:
        parts.append("the nearest train conversations as shots")
    elif candidate.shots:
        asked = ", ".join(repr(user_text(shot)[:30]) for shot in candidate.shots)
        parts.append(f"{len(candidate.shots)} fixed shots ({asked})")
    else:
        parts.append("no shots")
    return ", ".join(parts)
