"""`mlflow-finetune --help` reads as a table of contents: one whole line per command (no summary cut off
mid-parenthesis), and the way a fine-tune starts (`mlflow run DIR -e METHOD --backend finetune`). The four
servers' default ports differ, and a port in use is refused before anything loads, naming a free one."""

from __future__ import annotations

import socket

import click
import pytest
from click.testing import CliRunner

from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.cli._options import port_free


def _commands(group: click.Group, prefix: str = ""):
    for name, command in group.commands.items():
        yield f"{prefix}{name}", command
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")


def test_the_top_level_help_gives_one_whole_line_per_command_and_names_mlflow_run():
    result = CliRunner().invoke(main, ["--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    listed = result.output.split("Commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert sorted(line.split()[0] for line in listed) == sorted(main.commands)
    assert [line for line in listed if line.rstrip().endswith("...") or len(line) > 80] == []
    assert "mlflow run DIR -e METHOD --backend finetune" in " ".join(result.output.split())


@pytest.mark.parametrize("name", [name for name, _ in _commands(main)])
def test_every_command_has_a_short_help_of_its_own(name):
    command = dict(_commands(main))[name]
    assert command.short_help and len(command.short_help) <= 60 and not command.short_help.endswith("...")


def _port_default(command: str) -> int:
    return next(p.default for p in main.commands[command].params if p.name == "port")


def test_the_servers_default_ports_do_not_collide():
    ports = {name: _port_default(name) for name in ("serve", "openai-api", "playground", "studio")}
    assert len(set(ports.values())) == len(ports), ports


def test_a_port_in_use_is_refused_with_a_free_one_to_try():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(click.UsageError) as e:
            port_free("127.0.0.1", port)
        message = e.value.message
        assert message.startswith(f"port {port} on 127.0.0.1 is in use") and "try --port " in message
        suggested = int(message.rsplit("--port ", 1)[1])
        assert suggested > port
        port_free("127.0.0.1", suggested)  # free: no error
        # the command refuses it before the studio loads anything
        result = CliRunner().invoke(main, ["studio", "--port", str(port)])
        assert result.exit_code == 2 and f"port {port} on 127.0.0.1 is in use" in result.output
