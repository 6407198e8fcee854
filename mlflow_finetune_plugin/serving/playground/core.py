"""What the playground does, without the page: validate input, stream two answers, remember comparisons, log
votes, rate the versions from them, promote. `app.py` lays it out in Gradio; the scriptable endpoints call the
same methods."""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.arena.votes import EXPERIMENT, Comparison
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.registry.prompts import ServedPrompt
from mlflow_finetune_plugin.serving.base import (
    MAX_NEW_TOKENS_CAP,
    MAX_PROMPT_CHARS,
    Engine,
    ModelChoice,
    Settings,
    stream_pair,
)
from mlflow_finetune_plugin.serving.follow import AliasWatch, Followed
from mlflow_finetune_plugin.serving.playground.images import from_pane, store_images, user_message


@dataclass(frozen=True)
class PromptSide:
    """A registered optimized prompt as a playground side (`--against prompts:/NAME-prompt@ALIAS`): the base
    model `model` (a version's `:base`) asked with the prompt (`registry/prompts.apply_prompt`), fixed at
    start. Its key, `prompts:/NAME-prompt/V`, names it in the pickers and in the votes; a vote keeps the
    user's own messages, so the preference data it makes is the conversation as asked."""

    key: str
    model: ModelChoice
    prompt: ServedPrompt = field(default=None, compare=False)  # not hashed: it holds lists

    @property
    def name(self) -> str:
        return self.model.name

    @classmethod
    def from_registry(cls, uri: str) -> PromptSide:
        from mlflow_finetune_plugin.registry.prompts import base_version, served_prompt
        from mlflow_finetune_plugin.serving.choices import parse_ref

        served = served_prompt(uri)
        return cls(f"prompts:/{served.prompt_name}/{served.version}",
                   parse_ref(f"{base_version(served, uri)}:base"), served)

    def asked(self, messages: list[dict]) -> list[dict]:
        from mlflow_finetune_plugin.serving.prompted import asked

        return asked(messages, self.prompt)


_KEEP_COMPARISONS = 2000  # votable comparisons kept in memory (the oldest are forgotten first)
_STREAM_EVERY_S = 0.05    # at most this often a streamed update goes to the page


class Playground:
    """Two registry models answering the same prompts side by side, served by one engine.

    A side given by alias (`Followed`, looked up by `watch`) is the version the alias names now: its picker
    entry (`NAME@ALIAS`) follows the alias, so after a promotion new conversations answer with the new
    version, while a conversation under way stays on the version it started with."""

    def __init__(self, engine: Engine, model: ModelChoice | Followed,
                 against: ModelChoice | Followed | PromptSide, experiment: str = EXPERIMENT,
                 max_new_tokens_cap: int = MAX_NEW_TOKENS_CAP, max_prompt_chars: int = MAX_PROMPT_CHARS,
                 blind: bool = False, watch: AliasWatch | None = None, tracer=None):
        self.engine = engine
        self.watch = watch
        # serving.tracing.Tracer: each answer a trace, each vote feedback on both (None: off)
        self.tracer = tracer
        for side in (model, against):
            if isinstance(side, Followed) and (watch is None or side not in watch):
                raise FinetuneError(f"{side.key} is given by alias: pass the AliasWatch that follows it")
        self.sides = (model, against)
        self.prompt_sides = {side.key: side for side in self.sides if isinstance(side, PromptSide)}
        self.default_a, self.default_b = model.key, against.key
        self.names = list(dict.fromkeys([model.name, against.name]))
        self.experiment = experiment
        self.max_new_tokens_cap = max_new_tokens_cap
        self.max_prompt_chars = max_prompt_chars
        self.blind_default = blind
        self._comparisons: OrderedDict[str, Comparison] = OrderedDict()
        self._voted: set[str] = set()
        self._lock = threading.Lock()
        # key -> (trained system prompt, where it was found)
        self._system_prompts: dict[str, tuple[str, str]] = {}
        self._beams: dict[str, int] = {}  # key -> the beams its evaluation used (logged num_beams)
        self._vision: dict[str, bool] = {}  # key -> whether it takes images (its logged model_config says)
        # key -> its retriever.Retriever (None: it does not retrieve)
        self._retrievers: dict[str, object] = {}

    # ------------------------------------------------------------------------------------------- model
    # choices
    def choices(self) -> list[tuple[str, str]]:
        """(label, key) for every version and base model the pickers may offer, read from the registry now; a
        side given by alias first, as an entry that follows it."""
        from mlflow_finetune_plugin.serving.choices import distinct_labels, picker_choices

        listed = [c for name in self.names for c in picker_choices(name)]
        keys = {key for _, key in listed}
        # Pickers list one base entry per base model; the base of another version may be a default side.
        defaults = [(self.label(side.key), side.key) for side in dict.fromkeys(self.sides)
                    if isinstance(side, ModelChoice) and side.key not in keys]
        following = [(self.follow_label(side), side.key) for side in dict.fromkeys(self.sides)
                     if isinstance(side, Followed)]
        prompted = [(self.label(key), key) for key in self.prompt_sides]
        return following + prompted + distinct_labels(listed + defaults)

    def follow_label(self, ref: Followed) -> str:
        """The picker label of a side given by alias: what it follows, and the version that answers now."""
        from mlflow_finetune_plugin.registry import versions as registry
        from mlflow_finetune_plugin.serving.choices import base_name

        now = self.watch.current(ref)
        if ref.base:
            base = registry.get_version(now.name, now.version).tags.get(tags.BASE_MODEL)
            return f"base of {ref.name} @{ref.alias} (follows the alias; now {base_name(base)})"
        return f"{ref.name} @{ref.alias} (follows the alias; now v{now.version})"

    def resolve(self, key: str | None, default: str) -> ModelChoice:
        """A picker value as a model choice (a followed alias: the version it names now); only registry
        versions of this playground's models are accepted."""
        from mlflow_finetune_plugin.registry import versions as registry

        if (key or default) in self.prompt_sides:
            return self.prompt_sides[key or default]
        choice = self._choice(key or default)
        if choice.name not in self.names:
            raise FinetuneError(f"{choice.key} is not a model of this playground; pick a version of "
                                f"{' or '.join(self.names)}")
        registry.get_version(choice.name, choice.version)  # raises, listing what exists, for unknown versions
        return choice

    def _choice(self, key: str) -> ModelChoice:
        """The model that answers for picker value `key` (a prompt side: its base model)."""
        if key in self.prompt_sides:
            return self.prompt_sides[key].model
        ref = Followed.from_key(key)
        if ref is None:
            return ModelChoice.from_key(key)
        if self.watch is None or ref not in self.watch:
            raise FinetuneError(f"{key} is not followed by this playground: pick a version (NAME/VERSION)")
        return self.watch.current(ref)

    def label(self, key: str) -> str:
        from mlflow_finetune_plugin.serving.choices import describe

        if key in self.prompt_sides:
            prompt = self.prompt_sides[key].prompt
            return f"prompt {prompt.prompt_name} v{prompt.version} on {describe(self._choice(key))}"
        return describe(self._choice(key))

    def close(self) -> None:
        """Stop following the registry and release the engine."""
        if self.watch is not None:
            self.watch.stop()
        self.engine.close()

    def details(self, key_a: str | None, key_b: str | None) -> str:
        """The two picked models in full, as Markdown: their keys, and the whole base model references that
        their short labels leave out."""
        from mlflow_finetune_plugin.serving.choices import details

        lines = []
        for side, key, default in (("A", key_a, self.default_a), ("B", key_b, self.default_b)):
            try:
                choice = self.resolve(key, default)
            except FinetuneError:  # an unknown pick: sending reports it
                continue
            if isinstance(choice, PromptSide):
                lines.append(
                    f"- **Model {side}** `{choice.key}`: the registered optimized prompt (its instruction "
                    f"after your system prompt, its shots before your turns) on {details(choice.model)}")
                continue
            lines.append(f"- **Model {side}** `{choice.key}`: {details(choice)}")
        return "\n".join(lines)

    # ----------------------------------------------------------------------------------------- system prompt
    def trained_system_prompt(self, key: str | None) -> tuple[str, str]:
        """(system prompt, where it was found) version `key` (empty: model A) was trained with; ("", "") for a
        base model or a version trained without one."""
        from mlflow_finetune_plugin.serving.choices import trained_system_prompt

        choice = self.resolve(key, self.default_a)
        if isinstance(choice, PromptSide):  # the prompt brings its own instruction
            return "", ""
        if choice.key not in self._system_prompts:  # a version's model and run do not change: read them once
            self._system_prompts[choice.key] = trained_system_prompt(choice)
        return self._system_prompts[choice.key]

    def prefill(self, key_a: str | None, current: str | None, prefilled: str | None) -> tuple[str, str, str]:
        """The system prompt box once model A is `key_a`: A's trained system prompt while the box still holds
        the one pre-filled before (`prefilled`), else the user's edit, kept. Returns (box text, the pre-filled
        text the next change compares with, a note saying where the text came from)."""
        try:
            text, source = self.trained_system_prompt(key_a)
            label = self.label(key_a or self.default_a)
        except FinetuneError:  # an unknown pick: sending reports it; the box stays as it is
            return current or "", prefilled or "", ""
        if (current or "").strip() == (prefilled or "").strip():
            note = (f"{label} was trained with this system prompt ({source}); edit or clear "
                    "it.") if text else ""
            return text, text, note
        if not text or text.strip() == (current or "").strip():
            return current or "", text, ""
        trained = " ".join(text.split())  # one line: the note quotes it as a Markdown block quote
        note = f"Kept your edited system prompt. {label} was trained with this one ({source}):\n\n> {trained}"
        return current or "", text, note

    # --------------------------------------------------------------------------------------------- answering
    @property
    def default_max_new_tokens(self) -> int:
        return min(128, self.max_new_tokens_cap)

    def settings(self, temperature, top_p, max_new_tokens, num_beams=1) -> Settings:
        return Settings(float(temperature), float(top_p), int(max_new_tokens),
                        int(num_beams or 1)).checked(self.max_new_tokens_cap)

    def default_num_beams(self, key: str | None = None) -> int:
        """The beams model `key` (empty: model A) was evaluated with (`eval.num_beams`), so the page answers
        as the run's figures say; 1 (greedy) for versions evaluated greedily."""
        from mlflow_finetune_plugin.serving.choices import logged_num_beams

        try:
            choice = self.resolve(key, self.default_a)
        except FinetuneError:
            return 1
        choice = choice.model if isinstance(choice, PromptSide) else choice
        if choice.key not in self._beams:
            self._beams[choice.key] = logged_num_beams(choice)
        return self._beams[choice.key]

    def check_text(self, prompt: str, system_prompt: str = "") -> None:
        """Refuse empty prompts and input over the playground's length limit."""
        if not (prompt or "").strip():
            raise FinetuneError("the prompt is empty: type a question for both models")
        for what, text in (("prompt", prompt), ("system prompt", system_prompt or "")):
            if len(text) > self.max_prompt_chars:
                raise FinetuneError(f"the {what} is {len(text)} characters; the playground takes at most "
                                    f"{self.max_prompt_chars}")

    def check_images(self, sides: list[str], images) -> None:
        """Refuse images for a side that cannot see them (a text model, or an engine that sends text only):
        both
        sides answer the same message, or the comparison says nothing."""
        if not images:
            return
        if not self.engine.takes_images:
            raise FinetuneError(
                f"the {self.engine.name} engine sends the models text only: start the playground with "
                "--engine transformers to compare answers to images, or send text only")
        blind = [key for key in dict.fromkeys(sides) if not self.takes_images(key)]
        if blind:
            names = " and ".join(self.label(key) for key in blind)
            raise FinetuneError(
                f"{names} {'does' if len(blind) == 1 else 'do'} not take images: pick vision-language "
                "models on both sides (versions fine-tuned from an image-text model), or send the "
                "question without the image")

    def takes_images(self, key: str) -> bool:
        """Whether model `key` is a vision-language model (its logged model_config says so)."""
        from mlflow_finetune_plugin.serving.choices import takes_images

        choice = self._choice(key)
        if choice.key not in self._vision:
            self._vision[choice.key] = takes_images(choice)
        return self._vision[choice.key]

    @staticmethod
    def context(system_prompt: str, history: list[dict] | None, prompt: str,
                images: list[str] = ()) -> list[dict]:
        """The messages one side answers: system prompt, that side's earlier turns (a pane's images stored
        again, by content: the same copies), the new prompt with `images` (stored paths:
        `images.store_images`)."""
        messages = [{"role": "system", "content": system_prompt}] if (system_prompt or "").strip() else []
        for m in history or []:
            if m.get("role") in ("user", "assistant") and not (m.get("metadata") or {}).get("title"):
                messages.append(from_pane(m))
        return messages + [user_message(prompt, list(images))]

    @staticmethod
    def assign(key_a: str, key_b: str, blind: bool) -> list[str]:
        """Which model goes to the left and right pane: the picked order, or shuffled in blind mode."""
        sides = [key_a, key_b]
        if blind:
            random.shuffle(sides)
        return sides

    def stream(self, sides: list[str], contexts: list[list[dict]], settings: Settings,
               traces: list | None = None) -> Iterator[tuple[list[str], list[str | None]]]:
        """Both answers as they grow (texts, errors), at most every few tens of milliseconds, then once
        complete. When the playground traces, `traces` (a list, if given) receives the two answers' trace ids
        at the start (None for a side whose trace could not be started), and each trace ends with its whole
        answer."""
        choices = [self._choice(k) if k in self.prompt_sides else ModelChoice.from_key(k) for k in sides]
        contexts = [self.prompt_sides[k].asked(c) if k in self.prompt_sides else c for k,
                    c in zip(sides, contexts)]
        spans = [self._start_trace(c, m, settings) for c,
                 m in zip(choices, contexts)] if self.tracer else [None] * 2
        contexts = [self._retrieved(c, m, span) for c, m, span in zip(choices, contexts, spans)]
        if traces is not None:
            traces[:] = [span.trace_id if span is not None else None for span in spans]
        texts, errors = ["", ""], [None, None]
        last, whole = 0.0, False
        try:
            for i, piece, error in stream_pair(self.engine, list(zip(choices, contexts)), settings):
                texts[i] += piece
                if error:
                    errors[i] = error
                now = time.monotonic()
                if now - last >= _STREAM_EVERY_S:
                    last = now
                    yield texts, errors
            whole = True
            yield texts, errors
        finally:
            for i, span in enumerate(spans):
                if span is not None:
                    self._end_trace(span, choices[i], texts[i], errors[i] if whole else
                                    errors[i] or "the page stopped listening before the answer ended")

    def _retrieved(self, choice: ModelChoice, messages: list[dict], span) -> list[dict]:
        """A version trained with retrieval is asked with the chunks it retrieves, as `serve` asks it (the
        search a RETRIEVER span in the side's trace); the openai engine's server, `serve`, retrieves for it
        itself."""
        from mlflow_finetune_plugin.serving.choices import retriever_of
        from mlflow_finetune_plugin.serving.retrieving import asked

        if self.engine.retrieves_itself:
            return messages
        if choice.key not in self._retrievers:  # read from the version's logged model once
            self._retrievers[choice.key] = retriever_of(choice)
        return asked(self._retrievers[choice.key], messages, span)

    def _start_trace(self, choice: ModelChoice, messages: list[dict], settings: Settings):
        from mlflow_finetune_plugin.serving.choices import served_name

        inputs = {"model": served_name(choice), "messages": messages, "temperature": settings.temperature,
                  "top_p": settings.top_p, "max_tokens": settings.max_new_tokens,
                  **({"num_beams": settings.num_beams} if settings.num_beams > 1 else {})}
        return self.tracer.start(choice, choice.key, inputs)

    def _end_trace(self, span, choice: ModelChoice, text: str, error: str | None) -> None:
        from mlflow_finetune_plugin.serving.choices import served_name
        from mlflow_finetune_plugin.serving.tracing import completion

        # The engines do not say whether an answer stopped at max_new_tokens: finish_reason stays unknown.
        self.tracer.end(span, completion(text.strip(), served_name(choice)), error)

    def remember(self, comparison: Comparison) -> str:
        """Keep a finished comparison so it can be voted on; returns its id."""
        with self._lock:
            self._comparisons[comparison.id] = comparison
            while len(self._comparisons) > _KEEP_COMPARISONS:
                self._comparisons.popitem(last=False)
        return comparison.id

    def compare(self, prompt: str, model_a: str = "", model_b: str = "", system_prompt: str = "",
                temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int | None = None,
                blind: bool = False, num_beams: int | None = None, images=None) -> dict:
        """One whole comparison: both answers, and the id to vote with. A model failing is reported in its
        side's `error`, not raised; invalid input raises FinetuneError. `num_beams` empty: greedy, or the
        beams model A was evaluated with when temperature is 0. `images`: local image files or image data
        URLs, shown to both sides with the prompt (stored first: `images.store_image`)."""
        self.check_text(prompt, system_prompt)
        if not num_beams:
            num_beams = self.default_num_beams(model_a) if float(temperature) == 0 else 1
        settings = self.settings(temperature, top_p, max_new_tokens or self.default_max_new_tokens, num_beams)
        keys = [self.resolve(model_a, self.default_a).key, self.resolve(model_b, self.default_b).key]
        self.check_images(keys, images)
        sides = self.assign(*keys, blind)
        contexts = [self.context(system_prompt, [], prompt, store_images(images))] * 2
        traces = [None, None]
        # the last update holds both whole answers
        *_, (texts, errors) = self.stream(sides, contexts, settings, traces)
        answers = [t.strip() for t in texts]
        comparison_id = None
        if not any(errors):
            comparison_id = self.remember(Comparison(self.names[0], sides[0], sides[1], contexts[0],
                                                     contexts[1], answers[0], answers[1], settings.as_dict(),
                                                     bool(blind), traces=traces))
        return {"id": comparison_id, "blind": bool(blind), "settings": settings.as_dict(),
                **{side: {"answer": answers[i], "error": errors[i], "model": None if blind else sides[i],
                          "trace_id": traces[i]} for i, side in enumerate(("a", "b"))}}

    # ------------------------------------------------------------------------------------------------ voting
    def vote(self, comparison_id: str, verdict: str, user: str | None = None) -> dict:
        """Log the vote on comparison `comparison_id` to MLflow (once); reveals which model was which."""
        from mlflow_finetune_plugin.arena.votes import log_vote, normalize_verdict

        verdict = normalize_verdict(verdict)
        with self._lock:
            comparison = self._comparisons.get(comparison_id or "")
            if comparison is None:
                raise FinetuneError(
                    "there is no answer to vote on: compare first (or the comparison is too old)")
            if comparison_id in self._voted:
                raise FinetuneError("this comparison has a vote already: ask another question to vote again")
            self._voted.add(comparison_id)
        try:
            run_id = log_vote(comparison, verdict, user=user, experiment=self.experiment)
        except Exception:
            with self._lock:
                self._voted.discard(comparison_id)
            raise
        return {"run_id": run_id, "verdict": verdict, "model_a": comparison.model_a,
                "model_b": comparison.model_b, "label_a": self.label(comparison.model_a),
                "label_b": self.label(comparison.model_b), "traces": list(comparison.traces),
                "feedback": self._vote_feedback(comparison, verdict, run_id, user)}

    def _vote_feedback(self, comparison: Comparison, verdict: str, run_id: str, user: str | None) -> int:
        """A vote as thumbs on both answers' traces (votes.KTO_LABELS: the winner up, the loser down, a tie
        both up, both bad both down), under the feedback name a `traces:` source reads; returns how many were
        logged."""
        from mlflow_finetune_plugin.arena.votes import KTO_LABELS, VERDICTS
        from mlflow_finetune_plugin.serving.tracing import Feedback

        if self.tracer is None:
            return 0
        logged = 0
        for trace_id, up in zip(comparison.traces, KTO_LABELS[verdict]):
            feedback = Feedback(trace_id or "", thumbs=up, comment=f"playground vote: {VERDICTS[verdict]}",
                                user=user, metadata={"vote_run": run_id, "comparison": comparison.id})
            logged += bool(self.tracer.log_quietly(trace_id, feedback))
        return logged

    def summary(self) -> list[list]:
        from mlflow_finetune_plugin.arena.votes import summary_rows

        return [row for name in self.names for row in summary_rows(name, self.experiment)]

    def leaderboard(self) -> list[list]:
        """Arena ratings of the versions voted on here (votes.LEADERBOARD_HEADERS rows), best first."""
        from mlflow_finetune_plugin.arena.votes import leaderboard_rows, ratings, read_votes

        return leaderboard_rows(ratings([v for name in self.names
                                         for v in read_votes(name, self.experiment)]))

    def promote(self, version_key: str, alias: str = "", user: str | None = None) -> str:
        """The CLI's gated promotion (`mlflow-finetune promote`: the recipe's gates and, for the champion,
        serving parity) of a picked version."""
        from mlflow_finetune_plugin.serving.parity import promote_checked as promote

        choice = self.resolve(version_key, self.default_a)
        if isinstance(choice, PromptSide):  # the prompt's own gates (registry/prompts.promote_prompt)
            return promote(choice.prompt.prompt_name, choice.prompt.version,
                           alias=(alias or "").strip().lstrip("@") or None, user=user).report()
        if choice.base:
            raise FinetuneError("a base model is not a registered version: pick a version to promote")
        result = promote(choice.name, choice.version, alias=(alias or "").strip().lstrip("@") or None,
                         user=user)
        # a side that follows the alias moved: new conversations get it now, not later
        if self.watch is not None:
            self.watch.check()
        return result.report()
