"""A stronger model that writes instructions for the prompt search (`prompt_search.py`): an OpenAI-compatible
chat-completions server (`eval.optimize.proposer`, or `distill.teacher` when that is a URL), shown a sample of
the train conversations and asked for instructions, one a line, as the instruction proposers of MIPROv2 and
GEPA are asked. Nothing of the held-out rows is sent.

A proposer the recipe named (`eval.optimize.proposer`) that does not answer fails the evaluation before the
search; one inherited from `distill.teacher` is told about and the rows' own instructions are used instead.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.messages import split_conversation, text_of

SAMPLE_ROWS = 8  # train conversations shown to the proposer
TIMEOUT_S = 60.0
MAX_CHARS = 400  # an instruction longer than this is cut (a proposer that rambles would fill the context)

ASK = """Below are example conversations of one task: what a user asked, and the answer the assistant should \
give.
A small language model will answer new questions of this task. Write {n} different instructions for its system
prompt that would make it answer like these examples (content, length, tone, format). One instruction per \
line,
numbered "1.", "2.", ...; nothing else.

{examples}"""


@dataclass
class Proposer:
    url: str
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    required: bool = True  # named by eval.optimize.proposer: fail when it does not answer

    @property
    def label(self) -> str:
        return f"{self.url} ({self.model})" if self.model else self.url


def proposer_of(eval_cfg, distill=None) -> Proposer | None:
    """The recipe's proposer: eval.optimize.proposer, else distill.teacher when it is a URL (not required),
    else None (a registered-model teacher is not run for this: serve it and name its URL)."""
    opt = eval_cfg.optimize
    if opt.proposer:
        return Proposer(opt.proposer.rstrip("/"), opt.proposer_model, opt.api_key_env, required=True)
    teacher = getattr(distill, "teacher", None)
    if teacher and teacher.startswith(("http://", "https://")):
        return Proposer(teacher.rstrip("/"), opt.proposer_model or distill.model, distill.api_key_env,
                        required=False)
    if teacher:
        print(
            f"Prompt search: distill.teacher {teacher} is a registered model, which the search does not run; "
            "instructions come from the rows (serve it and set eval.optimize.proposer to its URL).")
    return None


def reachable(proposer: Proposer) -> None:
    """Raise, before anything trains, when a proposer the recipe names does not answer at /models."""
    import httpx

    try:
        with httpx.Client(timeout=10.0, headers=_headers(proposer), trust_env=False) as http:
            http.get(f"{proposer.url}/models").raise_for_status()
    except httpx.HTTPError as e:
        raise FinetuneError(
            f"eval.optimize.proposer {proposer.url} does not answer ({type(e).__name__}: {e}); "
            "nothing was trained. Start it, fix -P eval.optimize.proposer=URL (an OpenAI-compatible "
            "base URL ending in /v1), or leave it out to take instructions from the rows") from None


def propose(proposer: Proposer, train: list[list[dict]], n: int) -> list[str]:
    """Up to `n` instructions from `proposer`; [] (said) when an inherited proposer does not answer."""
    import httpx

    try:
        with httpx.Client(timeout=TIMEOUT_S, headers=_headers(proposer), trust_env=False) as http:
            model = proposer.model or _only_model(http, proposer.url)
            got = http.post(f"{proposer.url}/chat/completions",
                            json={"model": model, "temperature": 0.7, "max_tokens": 120 * n,
                                  "messages": [{"role": "user", "content": ASK.format(
                                      n=n, examples=_examples(train))}]})
            got.raise_for_status()
            text = ((got.json().get("choices") or [{}])[0].get("message") or {}).get("content") or ""
    except (httpx.HTTPError, ValueError, FinetuneError) as e:
        said = (f"the proposer {proposer.label} did not answer ({type(e).__name__}: {e})")
        if proposer.required:
            raise FinetuneError(
                f"{said}; nothing was searched. Start it, fix -P eval.optimize.proposer=URL, or "
                "leave it out to take instructions from the rows") from None
        print(f"Prompt search: {said}; instructions come from the rows instead.")
        return []
    found = parse_instructions(text)[:n]
    print(f"Prompt search: {len(found)} instructions from {proposer.label}.")
    return found


def parse_instructions(text: str) -> list[str]:
    """Numbered (or bulleted) lines of a proposer's answer, their numbers and quotes taken off, duplicates
    once."""
    out = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(\d+[.)]|[-*•])\s*", "", line).strip().strip('"').strip()
        if len(line.split()) >= 3 and line not in out:
            out.append(line[:MAX_CHARS])
    return out


def _headers(proposer: Proposer) -> dict:
    key = os.environ.get(proposer.api_key_env)  # read from the environment, never logged
    return {"Authorization": f"Bearer {key}"} if key else {}


def _only_model(http, url: str) -> str:
    got = http.get(f"{url}/models")
    got.raise_for_status()
    names = [m.get("id") for m in (got.json().get("data") or []) if isinstance(m, dict)]
    if len(names) != 1:
        raise FinetuneError(
            f"it serves {len(names)} models; name one with -P eval.optimize.proposer_model=NAME")
    return names[0]


def _examples(train: list[list[dict]]) -> str:
    pairs = [pair for conv in train if (pair := split_conversation(conv)) and pair[0]]
    shown = random.Random(0).sample(pairs, min(SAMPLE_ROWS, len(pairs)))
    blocks = []
    for prompt, answer in shown:
        system = " ".join(text_of(m.get("content")) for m in prompt if m.get("role") == "system")
        user = "\n".join(text_of(m.get("content")) for m in prompt if m.get("role") == "user")
        blocks.append((f"System: {system}\n" if system else "") + f"User: {user}\nAssistant: {answer}")
    return "\n\n".join(blocks)
