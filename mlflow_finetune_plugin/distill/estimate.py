"""What a distillation run will ask of its teacher, said before the first request: how many of the prompts
read the run uses (and which limits left the others unasked), how many of those are cached, and the tokens the
rest will cost. A hosted teacher is paid per token: the prompt tokens are counted with the student's tokenizer
and its chat template (the teacher's own tokenizer counts somewhat differently), the answer tokens are at most
`distill.max_tokens` each."""

from __future__ import annotations

import sys

from mlflow_finetune_plugin.messages import text_of

# Where the student's tokenizer cannot be loaded or cannot render a prompt: the usual rule of thumb for
# English text and BPE vocabularies, said as such beside the figure.
_CHARS_PER_TOKEN = 4
APPROXIMATED = f"approximated as {_CHARS_PER_TOKEN} characters a token"


def planned(recipe, read: int, used: int, todo: list, notes: list[str]) -> dict:
    """Print the plan (`read` prompts in the sources, `used` by the run, `todo` not cached yet, `notes`: the
    limits that left prompts unasked) and return it for `distill/summary.json`."""
    config = recipe.distill
    tokens, counted_by = prompt_tokens(recipe, todo) if todo else (0, None)
    plan = {"prompts_read": read, "prompts_used": used, "to_ask": len(todo), "cached": used - len(todo),
            "not_asked": notes, "prompt_tokens": tokens, "prompt_tokens_counted_by": counted_by,
            "answer_tokens_at_most": len(todo) * config.max_tokens}
    print(sentence(config, plan), file=sys.stderr)
    return plan


def sentence(config, plan: dict) -> str:
    """`Teacher URL: the run uses 20 of the 479 prompts (data.max_rows 16: ...); 20 to ask, 0 cached: about
    1,234 prompt tokens (...) and at most 5,120 answer tokens (20 x distill.max_tokens 256)`"""
    used, read = plan["prompts_used"], plan["prompts_read"]
    head = (f"Teacher {config.teacher}: the run uses {used} of the {read} prompt{'s' if read != 1 else ''}"
            + (f" ({'; '.join(plan['not_asked'])})" if plan["not_asked"] else ""))
    if not plan["to_ask"]:
        return f"{head}; every answer is cached: the teacher is not asked"
    cap = "" if config.max_prompts else "; -P distill.max_prompts=N caps them"
    return (
        f"{head}; {plan['to_ask']} to ask, {plan['cached']} cached: about {plan['prompt_tokens']:,} prompt "
        f"tokens ({plan['prompt_tokens_counted_by']}) and at most {plan['answer_tokens_at_most']:,} answer "
        f"tokens ({plan['to_ask']} x distill.max_tokens {config.max_tokens}){cap}")


def prompt_tokens(recipe, prompts: list) -> tuple[int, str]:
    """(tokens, how they were counted) of the prompts as the student's tokenizer renders them with the
    generation prompt; where it cannot load or render them, about one token per 4 characters of the messages'
    text."""
    model = recipe.model
    try:
        from mlflow_finetune_plugin.models.base import load_tokenizer
        from mlflow_finetune_plugin.models.chat_format import prompt_ids

        tok = load_tokenizer(model.name, model.revision, model.trust_remote_code, model.chat_template,
                             recipe.project_dir)
        return (sum(len(prompt_ids(tok, p.messages)) for p in prompts),
                f"the student's tokenizer, {model.name or 'tiny'}; the teacher's may count differently")
    # an estimate: any tokenizer or template failure falls back to characters
    except Exception as e:  # noqa: BLE001
        return (approximate_tokens(p.messages for p in prompts),
                f"{APPROXIMATED}: the student's tokenizer could not count them ({type(e).__name__})")


def approximate_tokens(conversations) -> int:
    """About one token per 4 characters of the messages' text, over an iterable of message lists."""
    chars = sum(len(text_of(m.get("content"), " ")) for messages in conversations for m in messages)
    return -(-chars // _CHARS_PER_TOKEN)
