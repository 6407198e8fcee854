"""`mlflow-finetune serve`: a real OpenAI-compatible server for registered versions, resolved from the registry.

- vllm: `vllm serve BASE --enable-lora --lora-modules NAME-vN=ADAPTER ...`; one server holds the base and every
  adapter given (they must share the base), so both sides of a comparison come from one process.
- transformers: `transformers serve FOLDER` on a merged copy (adapter folded into the base with PEFT's
  `merge_and_unload`), because `transformers serve` loads full model folders, not adapters.

Every model is served under the name `served_name(choice)` (`bot-v3`, or `bot-v3-base` for its base model), which
is what the playground's `openai` engine asks for by default.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.serving.base import ModelChoice
from mlflow_finetune_plugin.serving.choices import LocalModel, local_model, require_vllm_support
from mlflow_finetune_plugin.vllm_rules import max_lora_rank

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def served_name(choice: ModelChoice) -> str:
    """The model name a server started by `mlflow-finetune serve` gives `choice`: `bot-v3` or `bot-v3-base`."""
    return f"{choice.name}-v{choice.version}" + ("-base" if choice.base else "")


@dataclass
class ServerCommand:
    """A server to start: its argv, working directory, extra environment and the model names it serves."""

    argv: list[str]
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)


def vllm_command(choices: list[ModelChoice], host: str = "127.0.0.1", port: int = 8000,
                 extra: tuple[str, ...] = ()) -> ServerCommand:
    """`vllm serve` for `choices` (versions and/or `:base` choices) sharing one base; raises FinetuneError naming
    the fix when vLLM cannot serve one of them."""
    from mlflow_finetune_plugin.models.base import resolve_model_path

    locals_ = [local_model(c) for c in choices]
    full = [m for m in locals_ if not m.choice.base and not m.is_adapter]
    if full:
        if len(choices) > 1:
            raise FinetuneError(f"{full[0].choice.key} is a full fine-tune: it is its own model, so serve it alone "
                                "(one `mlflow-finetune serve` per full fine-tune, each on its own --port)")
        m = full[0]
        argv = ["vllm", "serve", str(m.artifacts["model"]), "--tokenizer", str(m.tokenizer_dir),
                "--served-model-name", served_name(m.choice)]
        return ServerCommand(argv + _common(host, port, extra), names=[served_name(m.choice)])
    bases = {m.base_key() for m in locals_}
    if len(bases) > 1:
        raise FinetuneError("one vLLM server holds one base model, and these versions were trained on different bases "
                            f"({', '.join(sorted(str(b[0]) for b in bases))}); start one server per base")
    for m in locals_:
        if not m.choice.base:
            require_vllm_support(m)
    first = locals_[0]
    base_names = [served_name(m.choice) for m in locals_ if m.choice.base] or [served_name(_base_of(first.choice))]
    adapters = [m for m in locals_ if not m.choice.base]
    argv = ["vllm", "serve", resolve_model_path(first.base_ref), "--tokenizer", str(first.tokenizer_dir),
            "--served-model-name", *base_names]
    if first.config.get("base_revision"):
        argv += ["--revision", first.config["base_revision"]]
    if adapters:
        rank = max_lora_rank(int(m.adapter_config().get("r", 8)) for m in adapters)
        argv += ["--enable-lora", "--max-lora-rank", str(rank),
                 "--max-loras", str(max(len(adapters), 1)),
                 "--lora-modules", *[f"{served_name(m.choice)}={m.adapter_dir}" for m in adapters]]
    return ServerCommand(argv + _common(host, port, extra),
                         names=base_names + [served_name(m.choice) for m in adapters])


def transformers_command(choice: ModelChoice, host: str = "127.0.0.1", port: int = 8000,
                         extra: tuple[str, ...] = ()) -> ServerCommand:
    """`transformers serve` pinned to the merged folder of `choice`.

    The server runs in the folder's parent and is given the folder's relative name, so the model's name in
    requests is `served_name(choice)` rather than a long cache path.
    """
    folder = merged_folder(choice)
    argv = [sys.executable, "-m", "transformers.cli.transformers", "serve", folder.name,
            "--host", host, "--port", str(port), *extra]
    # The update check would reach for PyPI at every start; servers are often offline.
    return ServerCommand(argv, cwd=str(folder.parent), env={"HF_HUB_DISABLE_UPDATE_CHECK": "1"},
                         names=[folder.name])


def _common(host: str, port: int, extra: tuple[str, ...]) -> list[str]:
    return ["--host", host, "--port", str(port), *extra]


def _base_of(choice: ModelChoice) -> ModelChoice:
    return ModelChoice(choice.name, choice.version, base=True)


def merged_folder(choice: ModelChoice) -> Path:
    """A full model folder for `choice` (made once, cached): the adapter merged into the base, the full
    fine-tune's weights, or (`:base`) the base weights; always with the version's logged tokenizer and chat
    template. Its name is `served_name(choice)`."""
    import hashlib

    from filelock import FileLock

    from mlflow_finetune_plugin.paths import cache_root

    local = local_model(choice)
    digest = hashlib.sha256(str(local.path).encode()).hexdigest()[:10]
    dest = cache_root() / "serving" / "merged" / digest / served_name(choice)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if not (dest / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
            try:
                _write_full_model(local, tmp)
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write_full_model(local: LocalModel, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from mlflow_finetune_plugin.logged_model import load_logged_base, load_logged_model

    c = local.choice
    if c.base:
        model = load_logged_base(local.config, torch.float32)
    else:
        model = load_logged_model(local.path, device="cpu").model
        if local.is_adapter:
            peft_type = local.adapter_config().get("peft_type")
            if not hasattr(model, "merge_and_unload") or peft_type in _UNMERGEABLE:
                raise FinetuneError(f"{c.name} v{c.version} is a {peft_type} adapter: it adds virtual tokens rather "
                                    "than weight updates, so it cannot be merged into a model folder. Compare it "
                                    f"with the transformers engine: `mlflow-finetune playground --model "
                                    f"{c.name}/{c.version} --engine transformers`")
            model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(local.tokenizer_dir).save_pretrained(out)


_UNMERGEABLE = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT")


def serve(refs: list[str], engine: str, host: str = "127.0.0.1", port: int = 8000, extra: tuple[str, ...] = (),
          dry_run: bool = False, echo=print) -> ServerCommand:
    """Resolve `refs` from the registry and serve them until a stop signal: vLLM in this process's place (exec),
    transformers as a child behind the OpenAI-compatible front (`front.run_front`); with `dry_run`, only return
    the server's command."""
    from mlflow_finetune_plugin.serving.choices import parse_ref

    choices = []
    for ref in refs:
        choices.append(parse_ref(ref, base_of=choices[0] if choices else None))
    if engine == "vllm":
        cmd = vllm_command(choices, host, port, extra)
    elif engine == "transformers":
        if len(choices) != 1:
            raise FinetuneError("`transformers serve` serves one model per server: give one MODEL_URI, and start "
                                "another server (another --port) for the other side, e.g. NAME/3:base")
        # The server listens on loopback only; the OpenAI-compatible front (serving/front.py) listens on host:port.
        from mlflow_finetune_plugin.serving.front import loopback_port

        cmd = transformers_command(choices[0], "127.0.0.1", loopback_port(), extra)
    else:
        raise FinetuneError(f"--engine {engine!r}: use vllm or transformers")
    if host not in LOOPBACK:
        echo(f"Warning: the server listens on {host}, reachable from other machines, with no authentication.")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/v1"
    echo(f"Serving {', '.join(cmd.names)} at {url}")
    echo(f"Compare in the playground: mlflow-finetune playground --model {refs[0]} --engine openai "
         f"--openai-url {url}")
    echo("$ " + " ".join(cmd.argv))
    if dry_run:
        return cmd
    if engine == "vllm" and shutil.which("vllm") is None:
        raise FinetuneError("the `vllm` command is not installed: `pip install 'mlflow-finetune-plugin[vllm]'` on a "
                            "CUDA machine, or serve with --engine transformers")
    sys.stdout.flush()
    if engine == "transformers":
        from mlflow_finetune_plugin.serving.front import run_front

        inner_port = int(cmd.argv[cmd.argv.index("--port") + 1])
        sys.exit(run_front(cmd.argv, cmd.names, host, port, inner_port, cwd=cmd.cwd, env=cmd.env))
    if cmd.cwd:
        os.chdir(cmd.cwd)
    os.execvpe(cmd.argv[0], cmd.argv, {**os.environ, **cmd.env})
    return cmd  # not reached
