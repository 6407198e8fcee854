"""The chat after a run: the A/B playground (`mlflow-finetune playground`) on the run's version against its
base or the champion, started by the studio as a child process on a free port of the studio's own address,
with the same login. One at a time: opening another stops the last. Its own process keeps the models' memory
out of the page's, and a crash of one leaves the other standing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from threading import Thread

from mlflow_finetune_plugin.errors import FinetuneError

START_TIMEOUT_S = 600.0  # loading a real model (smollm2 dequantizes for ~20 s; a 7B takes minutes)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host if host not in ("0.0.0.0", "::") else "127.0.0.1", 0))
        return s.getsockname()[1]


class Chats:
    """The playground child process (`open` starts one and waits until it answers; `close` stops it)."""

    def __init__(self, host: str, auth: str | None, workdir: Path, engine: str = "transformers"):
        self.host, self.auth, self.engine = host, auth, engine
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.opened: tuple[str, str, bool] | None = None
        self._log: deque[str] = deque(maxlen=40)

    def argv(self, model: str, against: str, blind: bool, port: int) -> list[str]:
        return [sys.executable, "-c", "from mlflow_finetune_plugin.cli import main; main()", "playground",
                "--model", model, "--against", against, "--engine", self.engine, "--host", self.host,
                "--port", str(port), *(["--blind"] if blind else [])]

    def open(self, model: str, against: str = "base", blind: bool = False) -> int:
        """The playground on `model` (NAME/VERSION) against `against` (base, NAME@champion); returns its port.
        The same three again reuse the running one."""
        if self.opened == (model, against, blind) and self.proc is not None and self.proc.poll() is None:
            return self.port
        self.close()
        port = free_port(self.host)
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
        env.pop("MLFLOW_FINETUNE_PLAYGROUND_AUTH", None)
        if self.auth:  # in the environment, not the command line (other users can read a process's arguments)
            env["MLFLOW_FINETUNE_PLAYGROUND_AUTH"] = self.auth
        self._log.clear()
        # a session of its own: `close` stops it and whatever it started as one group
        self.proc = subprocess.Popen(self.argv(model, against, blind, port), env=env, cwd=self.workdir,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     start_new_session=True)
        Thread(target=self._read, args=(self.proc,), daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = "\n".join(self._log)
                self.proc = None
                raise FinetuneError(
                    f"the playground for {model} against {against} stopped before it answered:\n"
                    f"{tail}")
            if _answers(self.host, port):
                self.port, self.opened = port, (model, against, blind)
                return port
            time.sleep(0.5)
        self.close()
        raise FinetuneError(f"the playground for {model} did not answer within {START_TIMEOUT_S:.0f} s")

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self._log.append(line.rstrip())

    def log_tail(self) -> str:
        return "\n".join(self._log)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            from mlflow_finetune_plugin.serving.front import stop_group

            stop_group(self.proc, timeout=20)
        self.proc, self.port, self.opened = None, None, None


def _answers(host: str, port: int) -> bool:
    import urllib.request

    address = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/gradio_api/info", timeout=2) as response:
            return response.status in (200, 401)
    except OSError as e:
        return getattr(e, "code", None) == 401  # a login-protected page answers 401 before the login
