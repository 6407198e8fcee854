"""Generation from a loaded chat model: one answer, a left-padded batch of greedy (or beam-search) answers, or
their ids, text-only or with images; the stop ids every end-of-turn token gives; and the inputs a caller may
give (a string, message lists, a DataFrame). The evaluation, the serving engines and the logged model's pyfunc
(`logged_model.py`) all answer through it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.models.vision import processor_of
from mlflow_finetune_plugin.retriever import Retriever


@dataclass
class LoadedModel:
    model: Any          # PeftModel over the base, or a full model
    tokenizer: Any
    config: dict        # the logged model_config
    retriever: Retriever | None = None  # a version trained with retrieval: what it retrieves from


def stop_at_every_end_of_turn(model, tokenizer) -> None:
    """Every end-of-turn id into the model's generation config, which a plain `generate`, the exported folder
    and `vllm serve` stop on: an adapter carries no generation config of its own, and a base model given a
    chat template (`model.chat_template`) knows only its own eos."""
    from mlflow_finetune_plugin.models.chat_format import stop_ids

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    stops = stop_ids(tokenizer, inner.generation_config)
    if stops:
        inner.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]


def to_conversations(model_input) -> list[list[dict]]:
    """Accept a string, a list of strings, a list of message lists, a dict or a DataFrame with
    `messages`/`prompt`."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        col = "messages" if "messages" in model_input.columns else "prompt"
        if col not in model_input.columns:
            raise FinetuneError("input needs a `messages` column (chat) or a `prompt` column (text)")
        model_input = list(model_input[col])
    if isinstance(model_input, (str, dict)):
        model_input = [model_input]
    convs = []
    for item in model_input:
        if isinstance(item, str):
            convs.append([{"role": "user", "content": item}])
        elif isinstance(item, dict) and "messages" in item:
            convs.append(list(item["messages"]))
        elif isinstance(item, dict) and "prompt" in item:
            convs.append([{"role": "user", "content": item["prompt"]}])
        else:
            convs.append([dict(m) for m in item])
    return convs


def generate(loaded: LoadedModel, messages: list[dict], max_new_tokens=64, temperature=0.0, top_p=1.0,
             num_beams=1) -> str:
    """One chat answer from a loaded model (greedy when temperature is 0, beam search with num_beams > 1)."""
    import torch

    from mlflow_finetune_plugin.models.answers import answer_text
    from mlflow_finetune_plugin.models.chat_format import prompt_ids, stop_ids

    tok, model = loaded.tokenizer, loaded.model
    if processor_of(tok) is not None:
        return _generate_with_images(loaded, [messages], max_new_tokens, temperature, top_p, num_beams)[0]
    ids = torch.tensor([prompt_ids(tok, messages)], device=model.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False, **_beams(num_beams)}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=int(max_new_tokens), pad_token_id=tok.pad_token_id,
                             eos_token_id=stop_ids(tok, model.generation_config), **sampling)
    return answer_text(tok, out[0, ids.shape[1]:].tolist())


def generate_greedy_batch(loaded: LoadedModel, conversations: list[list[dict]], max_new_tokens=64,
                          num_beams=1) -> list[str]:
    """Greedy (or beam search) chat answers to several conversations as one batch: the answers `generate`
    gives one at a time."""
    from mlflow_finetune_plugin.models.answers import answer_text

    if processor_of(loaded.tokenizer) is not None:
        return _generate_with_images(loaded, conversations, max_new_tokens, 0.0, 1.0, num_beams)
    # Rows that end early are filled with padding, after their stop token: answer_text cuts there.
    return [answer_text(loaded.tokenizer, row) for row in generated_ids(loaded, conversations, max_new_tokens,
                                                                        num_beams)]


def generated_ids(loaded: LoadedModel, conversations: list[list[dict]], max_new_tokens=64,
                  num_beams=1) -> list[list[int]]:
    """The ids `generate_greedy_batch` reads its answers from (text-only models): each row's generated ids
    after its prompt, padded after its stop id where it ended early (`models.answers.ending` tells how it
    ended)."""
    import torch

    from mlflow_finetune_plugin.models.chat_format import prompt_ids, stop_ids

    tok, model = loaded.tokenizer, loaded.model
    encs = [{"input_ids": (ids := prompt_ids(tok, messages)), "attention_mask": [1] * len(ids)}
            for messages in conversations]
    # Left padding: every row's next token comes right after its prompt (generate derives the positions from
    # the
    # attention mask). Passed per call rather than set on the tokenizer, which a server may share across
    # threads.
    enc = tok.pad(encs, padding_side="left", return_tensors="pt")
    enc = {k: v.to(model.device) for k, v in enc.items()}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=int(max_new_tokens), pad_token_id=tok.pad_token_id,
                             eos_token_id=stop_ids(tok, model.generation_config), do_sample=False,
                             **_beams(num_beams))
    return [row.tolist() for row in out[:, enc["input_ids"].shape[1]:]]


def _generate_with_images(loaded: LoadedModel, conversations, max_new_tokens, temperature, top_p, num_beams):
    """Answers of a vision-language model: each conversation's images read from its image parts (paths, data
    URLs, OpenAI `image_url` parts) and given to the processor with the rendered prompts, as one left-padded
    batch."""
    from mlflow_finetune_plugin.models import image_inputs

    placed = [image_inputs.with_placeholders(messages) for messages in conversations]
    images = [[image_inputs.read_image(ref) for ref in refs] for _, refs in placed]
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    return image_inputs.generate_answers(loaded.model, loaded.tokenizer, processor_of(loaded.tokenizer),
                                         [m for m, _ in placed], images, max_new_tokens,
                                         1 if sampling else int(num_beams or 1), **sampling)


def _beams(num_beams) -> dict:
    """generate()'s beam-search arguments: the answer as a whole most likely under the model
    (length-normalised), not the one whose first token is (greedy). Canned answers sharing their first words
    are told apart this way."""
    return {"num_beams": int(num_beams), "early_stopping": True} if int(num_beams or 1) > 1 else {}
