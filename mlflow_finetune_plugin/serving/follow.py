"""Serving that follows the registry: a model given by alias (`NAME@champion`) is served as the version the
alias names now, so moving the alias (`mlflow-finetune promote`) deploys the new version without a restart.

`AliasWatch` polls the registry every few seconds for each followed alias and hands each move to the server
(`serve` starts the new version beside the old one, then switches) or the playground (new conversations answer
with it). The registry's webhooks (`model_version_alias.created`) would need the tracking server to reach this
process, and a file or sqlite store has none: polling works with every store, at one cheap registry call per
alias and interval.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.serving.base import ModelChoice

# Seconds between two looks at the registry: a promotion is served within this long.
DEFAULT_INTERVAL_S = 10.0


@dataclass(frozen=True)
class Followed:
    """A model given by alias: the version `name@alias` names, or (base=True) that version's base model."""

    name: str
    alias: str
    base: bool = False

    @property
    def key(self) -> str:
        """`NAME@ALIAS` or `NAME@ALIAS:base`: the value of its entry in the playground's pickers."""
        return f"{self.name}@{self.alias}" + (":base" if self.base else "")

    @classmethod
    def from_key(cls, key: str | None) -> Followed | None:
        """Inverse of `key`; None for anything else (a version's key `NAME/3`)."""
        text = (key or "").strip()
        base = text.endswith(":base")
        name, sep, alias = text.removesuffix(":base").removeprefix("models:/").partition("@")
        if not sep or not name or not alias or "/" in alias:
            return None
        return cls(name, alias, base)


def followed(ref: str, default_name: str | None = None, base_of: Followed | None = None) -> Followed | None:
    """The alias a reference names (`NAME@ALIAS`, `models:/NAME@ALIAS`, `NAME@ALIAS:base`, or an alias of
    `default_name`; `base` when `base_of` is followed), None when it names a version (`NAME/3`, `3`)."""
    text = ref.strip()
    if text == "base":
        return Followed(base_of.name, base_of.alias, base=True) if base_of else None
    found = Followed.from_key(text)
    if found or not default_name:
        return found
    plain = text.removesuffix(":base").lstrip("@")
    if "/" in plain or not plain or plain.isdigit() or (plain[:1] in "vV" and plain[1:].isdigit()):
        return None
    return Followed(default_name, plain, text.endswith(":base"))


def resolve(ref: Followed) -> ModelChoice:
    """The version `ref` names in the registry now (raises FinetuneError when the alias is gone)."""
    from mlflow_finetune_plugin.registry import versions as registry

    mv = registry.get_version(ref.name, "@" + ref.alias)
    return ModelChoice(mv.name, str(mv.version), ref.base)


class AliasWatch:
    """The versions followed aliases name, looked up every `interval` seconds (or on `check()`).

    `on_move(ref, old, new)` is called, from the watching thread, when an alias moved; it returns what it did,
    for the log, or raises (FinetuneError saying why) when it cannot serve `new`: then `old` stays current,
    and `new` is not tried again until the alias moves once more.
    """

    def __init__(self, on_move=None, interval: float = DEFAULT_INTERVAL_S, echo=print):
        self.on_move, self.interval, self.echo = on_move, interval, echo
        self._current: dict[Followed, ModelChoice] = {}
        self._refused: dict[Followed, str] = {}
        self._last_error: str | None = None
        self._lock = threading.Lock()
        self._checking = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def follow(self, ref: Followed, current: ModelChoice | None = None) -> ModelChoice:
        """Start following `ref` (served as `current`, else the version it names now); returns that
        version."""
        with self._lock:
            if ref not in self._current:
                self._current[ref] = current or resolve(ref)
            return self._current[ref]

    def __contains__(self, ref: Followed) -> bool:
        return ref in self._current

    def current(self, ref: Followed) -> ModelChoice:
        """The version `ref` is served as now."""
        with self._lock:
            return self._current[ref]

    def check(self) -> list[tuple[Followed, ModelChoice, ModelChoice]]:
        """Look at the registry once; hand each moved alias to `on_move`. Returns the moves served."""
        # the watching thread and a caller (the playground's promotion) never hand one move twice
        with self._checking:
            return self._check()

    def _check(self) -> list[tuple[Followed, ModelChoice, ModelChoice]]:
        moves = []
        for ref in list(self._current):
            try:
                new = resolve(ref)
            # a registry outage or a deleted alias: keep serving, say so once
            except Exception as e:  # noqa: BLE001
                self._say_once(f"{ref.key}: cannot read the registry ({e}); still serving "
                               f"v{self._current[ref].version}")
                continue
            old = self._current[ref]
            if new == old or self._refused.get(ref) == new.version:
                continue
            stamp = time.strftime("%H:%M:%S")
            try:
                done = self.on_move(ref, old, new) if self.on_move else ""
            except Exception as e:  # noqa: BLE001 - whatever failed, the old version goes on answering
                self._refused[ref] = new.version
                why = str(e) if isinstance(e, FinetuneError) else f"{type(e).__name__}: {e}"
                self.echo(
                    f"[{stamp}] {ref.key} moved from v{old.version} to v{new.version}, which cannot be "
                    f"served here: {why}\nStill serving v{old.version}.")
                continue
            with self._lock:
                self._current[ref] = new
            self._refused.pop(ref, None)
            self._last_error = None
            moves.append((ref, old, new))
            self.echo(f"[{stamp}] {ref.key} moved from v{old.version} to v{new.version}"
                      + (f": {done}" if done else ""))
        return moves

    def start(self) -> AliasWatch:
        """Check every `interval` seconds in a daemon thread until `stop()`; nothing when nothing is
        followed."""
        if self._current and self.interval > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="alias-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()

    def _say_once(self, message: str) -> None:
        if message != self._last_error:
            self._last_error = message
            self.echo(message)
