"""The A/B playground page: two chats streaming side by side from one prompt box (text, and images for
vision-language models), blind votes, a leaderboard of arena ratings, win rates, promotion, and scriptable
endpoints (`compare`, `system_prompt`, `vote`, `leaderboard`, `summary`, `promote`) for gradio_client."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
from gradio.data_classes import FileData

from mlflow_finetune_plugin.arena.ratings import MIN_VOTES
from mlflow_finetune_plugin.arena.votes import LEADERBOARD_HEADERS, SUMMARY_HEADERS, VERDICTS
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.serving.base import MAX_BEAMS
from mlflow_finetune_plugin.serving.playground.core import Playground
from mlflow_finetune_plugin.serving.playground.images import MAX_IMAGE_BYTES, pane_files, store_images

_BLIND_LABELS = ("Model A", "Model B")
_CSS = "#chat-a, #chat-b {min-height: 320px}"
EMPTY_LEADERBOARD = "No votes yet: compare two answers in blind mode and vote, and the ratings appear here."


def _user(request: gr.Request | None) -> str | None:
    return getattr(request, "username", None) if request is not None else None


def _checked(fn, *args, **kwargs):
    """Run fn; user errors become gr.Error (shown in the page, or raised by gradio_client), never a crash."""
    try:
        return fn(*args, **kwargs)
    except FinetuneError as e:
        raise gr.Error(str(e), print_exception=False) from None


def build_app(pg: Playground, title: str = "mlflow-finetune playground") -> gr.Blocks:
    """The playground as a gr.Blocks (queue set for the engine's concurrency); launch it with `launch()`."""
    choices = _checked(pg.choices)
    versions = [c for c in choices if not c[1].endswith(":base")]
    ui = SimpleNamespace()  # the page's components by name, shared by its layout and its wiring
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"## {title}\nOne prompt, two models, answers side by side. Blind mode hides which is which "
            "until you vote.")
        _models_and_settings(pg, ui, choices)
        _chats_votes_and_promotion(pg, ui, versions)
        _wire_chat(pg, ui)
        _wire_votes_and_promotion(pg, ui, demo)
        _endpoints(pg)
    # Each request streams two answers; the engine decides how many run at once. Waiting requests queue up.
    demo.queue(default_concurrency_limit=max(1, pg.engine.concurrency), max_size=64)
    return demo


def _models_and_settings(pg: Playground, ui, choices) -> None:
    """The two pickers, the models' details, the shared system prompt and generation settings."""
    sides = gr.State(None)   # [left key, right key] of the running conversation
    last = gr.State(None)    # id of the last complete comparison: what a vote is about
    with gr.Row():
        pick_a = gr.Dropdown(choices, value=pg.default_a, label="Model A", elem_id="pick-a", scale=3)
        pick_b = gr.Dropdown(choices, value=pg.default_b, label="Model B", elem_id="pick-b", scale=3)
        blind = gr.Checkbox(value=pg.blind_default, label="Blind mode", elem_id="blind", scale=1)
    # Labels name a base model briefly (smollm2's reference is a line long); its whole reference is one click
    # away.
    with gr.Accordion("Model details (full base model references)", open=False, elem_id="model-details-box"):
        model_details = gr.Markdown(pg.details(pg.default_a, pg.default_b), elem_id="model-details")
    # Model A's trained system prompt, pre-filled: without it a tuned model answers out of character.
    system_text, prefilled_text, system_note = pg.prefill(pg.default_a, "", "")
    prefilled = gr.State(prefilled_text)  # what was pre-filled: a box still holding it is not a user's edit
    with gr.Accordion("System prompt and generation settings (shared by both sides)", open=bool(system_text)):
        system = gr.Textbox(value=system_text, label="System prompt", lines=2, max_length=pg.max_prompt_chars,
                            elem_id="system")
        note = gr.Markdown(system_note, elem_id="system-note")
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            max_new = gr.Slider(1, pg.max_new_tokens_cap, value=pg.default_max_new_tokens, step=1,
                                label="Max new tokens")
            # The decoding model A's figures were scored with (eval.num_beams); beam answers come whole.
            beams = gr.Slider(1, MAX_BEAMS, value=pg.default_num_beams(pg.default_a), step=1, elem_id="beams",
                              label="Beams (1 = token by token; more: beam search at temperature 0, "
                                    "each answer shown when complete)")
    vars(ui).update(sides=sides, last=last, pick_a=pick_a, pick_b=pick_b, blind=blind)
    vars(ui).update(model_details=model_details, prefilled=prefilled, system=system, note=note)
    vars(ui).update(temperature=temperature, top_p=top_p, max_new=max_new, beams=beams)


def _chats_votes_and_promotion(pg: Playground, ui, versions) -> None:
    """The two chat panes and the prompt box, the vote buttons, the leaderboard, the win rates, Promote."""
    with gr.Row():
        chat_a = gr.Chatbot(label=_label(pg, pg.default_a, pg.blind_default, 0), elem_id="chat-a", height=380)
        chat_b = gr.Chatbot(label=_label(pg, pg.default_b, pg.blind_default, 1), elem_id="chat-b", height=380)
    with gr.Row():
        # Images go to both sides with the text; a text model refuses them in the status line (check_images).
        prompt = gr.MultimodalTextbox(placeholder="Ask both models… (vision-language models: attach images)",
                                      show_label=False, lines=1, scale=6, elem_id="prompt",
                                      sources=["upload"], file_types=["image"], file_count="multiple",
                                      submit_btn=False)
        send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        clear = gr.Button("New conversation", scale=1, elem_id="clear")
    status = gr.Markdown(elem_id="status")
    with gr.Row():
        vote_buttons = {v: gr.Button(label, elem_id=f"vote-{v.replace('_', '-')}") for v,
                        label in VERDICTS.items()}
    with gr.Accordion("Leaderboard (arena ratings from the votes)", open=True):
        gr.Markdown("Bradley-Terry ratings on the Elo scale (1000 = the average of the versions here), 95% "
                    "bootstrap intervals, as Chatbot Arena computes them; a tie or 'both bad' is half a win "
                    "each way. Two versions are told apart only when their intervals do not overlap and each "
                    f"has at least {MIN_VOTES} votes.")
        leaderboard = gr.Dataframe(headers=LEADERBOARD_HEADERS, interactive=False, elem_id="leaderboard")
        board_note = gr.Markdown(EMPTY_LEADERBOARD, elem_id="leaderboard-note")
        refresh = gr.Button("Refresh leaderboard", size="sm", elem_id="refresh-leaderboard")
    with gr.Accordion("Win rates (votes logged to MLflow)", open=False):
        table = gr.Dataframe(headers=SUMMARY_HEADERS, interactive=False, elem_id="win-rates")
    with gr.Accordion("Promote (the same gated promotion as `mlflow-finetune promote`)", open=False):
        with gr.Row():
            promote_pick = gr.Dropdown(versions, value=pg.default_a if not pg.default_a.endswith(":base")
                                       else None, label="Version", scale=3)
            alias = gr.Textbox(label="Alias", placeholder="blank: the recipe's champion alias", scale=2)
            promote_btn = gr.Button("Check gates and promote", scale=1, elem_id="promote")
        promote_out = gr.Markdown(elem_id="promote-out")
    vars(ui).update(chat_a=chat_a, chat_b=chat_b, prompt=prompt, send=send, clear=clear, status=status)
    vars(ui).update(vote_buttons=vote_buttons, leaderboard=leaderboard, board_note=board_note)
    vars(ui).update(refresh=refresh, table=table, promote_pick=promote_pick, alias=alias)
    vars(ui).update(promote_btn=promote_btn, promote_out=promote_out)


def _wire_chat(pg: Playground, ui):
    sides, last, pick_a, pick_b, blind = ui.sides, ui.last, ui.pick_a, ui.pick_b, ui.blind
    model_details, prefilled, system, note = ui.model_details, ui.prefilled, ui.system, ui.note
    temperature, top_p, max_new, beams, chat_a = ui.temperature, ui.top_p, ui.max_new, ui.beams, ui.chat_a
    chat_b, prompt, send, clear, status = ui.chat_b, ui.prompt, ui.send, ui.clear, ui.status

    # ---- chatting
    def on_send(message, hist_a, hist_b, key_a, key_b, system_prompt, temp, p, max_tokens, is_blind, running,
                num_beams):
        text, files = (message or {}).get("text") or "", (message or {}).get("files") or []
        try:  # input the models cannot take: said in the status line, the prompt kept to fix
            pg.check_text(text, system_prompt)
            settings = pg.settings(temp, p, max_tokens, num_beams)
            if running is None or not (hist_a or hist_b):
                running = pg.assign(pg.resolve(key_a, pg.default_a).key, pg.resolve(key_b, pg.default_b).key,
                                    bool(is_blind))
            pg.check_images(running, files)
            images = store_images(files)
        except FinetuneError as e:
            yield gr.update(), gr.update(), gr.update(), f"**Not sent:** {e}", gr.update(), gr.update()
            return
        contexts = [pg.context(system_prompt, hist, text, images) for hist in (hist_a, hist_b)]
        # The panes show the uploads (Gradio serves its own upload folder); the models read the stored copies.
        shown = [*({"path": f} for f in files), text] if files else text
        hists = [[*(_plain(h)), {"role": "user", "content": shown}, {"role": "assistant", "content": ""}]
                 for h in (hist_a, hist_b)]
        labels = [_label(pg, running[i], is_blind, i) for i in range(2)]

        def panes():
            return [gr.update(value=hists[i], label=labels[i]) for i in range(2)]

        yield (*panes(), "", "Answering…", running, None)
        texts, errors, traces = ["", ""], [None, None], [None, None]
        for texts, errors in pg.stream(running, contexts, settings, traces):
            for i in range(2):
                hists[i][-1] = _answer(texts[i], errors[i])
            yield (*panes(), "", "Answering…", running, None)
        if any(errors):
            failed = " ".join(f"**{_BLIND_LABELS[i]} failed:** {errors[i]}" for i in range(2) if errors[i])
            yield (*panes(), "", failed, running, None)
            return
        comparison = pg.remember(_comparison(pg, running, contexts, texts, settings, is_blind, traces))
        yield (*panes(), "", "Which answer is better? Vote below.", running, comparison)

    chat_outputs = [chat_a, chat_b, prompt, status, sides, last]
    chat_inputs = [prompt, chat_a, chat_b, pick_a, pick_b, system, temperature, top_p, max_new, blind, sides,
                   beams]
    for trigger in (send.click, prompt.submit):
        trigger(on_send, chat_inputs, chat_outputs, api_visibility="private")

    def on_clear(key_a, key_b, is_blind):
        return (gr.update(value=[], label=_label(pg, key_a, is_blind, 0)),
                gr.update(value=[], label=_label(pg, key_b, is_blind, 1)), None, None, "")

    reset_outputs = [chat_a, chat_b, sides, last, status]
    for trigger in (clear.click, pick_a.change, pick_b.change, blind.change):
        trigger(on_clear, [pick_a, pick_b, blind], reset_outputs, api_visibility="private", queue=False)

    pick_a.change(pg.prefill, [pick_a, system, prefilled], [system, prefilled, note],
                  api_visibility="private", queue=False)
    for trigger in (pick_a.change, pick_b.change):
        trigger(pg.details, [pick_a, pick_b], model_details, api_visibility="private", queue=False)
    pick_a.change(pg.default_num_beams, [pick_a], beams, api_visibility="private", queue=False)


def _wire_votes_and_promotion(pg: Playground, ui, demo):
    sides, last, pick_a, pick_b, chat_a = ui.sides, ui.last, ui.pick_a, ui.pick_b, ui.chat_a
    chat_b, status, vote_buttons, leaderboard = ui.chat_b, ui.status, ui.vote_buttons, ui.leaderboard
    board_note, refresh, table, promote_pick = ui.board_note, ui.refresh, ui.table, ui.promote_pick
    alias, promote_btn, promote_out = ui.alias, ui.promote_btn, ui.promote_out

    # ---- voting
    def make_vote(verdict):
        def on_vote(comparison_id, running, request: gr.Request):
            result = _checked(pg.vote, comparison_id, verdict, _user(request))
            reveal = (f"Vote logged ({VERDICTS[verdict]}): A was **{result['label_a']}**, "
                      f"B was **{result['label_b']}**.")
            rows = _checked(pg.leaderboard)
            return (reveal, None, gr.update(label=f"A: {result['label_a']}"),
                    gr.update(label=f"B: {result['label_b']}"), _checked(pg.summary), rows, _board_note(rows))
        return on_vote

    for verdict, button in vote_buttons.items():
        button.click(make_vote(verdict), [last, sides],
                     [status, last, chat_a, chat_b, table, leaderboard, board_note], api_visibility="private",
                     concurrency_limit=None)

    def leaderboard_rows():
        """Arena ratings of the versions voted on here: rows of [rank, model, rating, 95% interval, votes,
        note]."""
        return _checked(pg.leaderboard)

    # The endpoint returns the table alone; the note follows in the page (gradio_client does not run .then()).
    refresh.click(leaderboard_rows, None, leaderboard, api_name="leaderboard", concurrency_limit=None).then(
        _board_note, leaderboard, board_note, api_visibility="private", queue=False)

    def on_promote(key, alias_text, request: gr.Request):
        report = _checked(pg.promote, key, alias_text, _user(request))
        return f"```\n{report}\n```"

    promote_btn.click(on_promote, [promote_pick, alias], promote_out, api_visibility="private",
                      concurrency_limit=1)

    def on_load():
        fresh, rows = _checked(pg.choices), _checked(pg.leaderboard)
        return (gr.update(choices=fresh), gr.update(choices=fresh),
                gr.update(choices=[c for c in fresh if not c[1].endswith(":base")]), _checked(pg.summary),
                rows, _board_note(rows))

    demo.load(on_load, None, [pick_a, pick_b, promote_pick, table, leaderboard, board_note],
              api_visibility="private")


def _endpoints(pg: Playground) -> None:
    # ---- scriptable endpoints (one call each: gradio_client does not run .then() chains)
    def compare(prompt: str, model_a: str = "", model_b: str = "", system_prompt: str = "",
                temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int | None = None,
                blind: bool = False, num_beams: int | None = None,
                images: list[FileData | str] | None = None) -> dict:
        """Both answers to `prompt` and the comparison id to vote with (model_a/model_b: NAME/VERSION or
        NAME/VERSION:base; empty = the playground's defaults; max_new_tokens empty = 128 or the cap; num_beams
        empty = the beams model A was evaluated with at temperature 0, else 1); with --trace, each side's
        trace_id. images: shown to both sides before the prompt (vision-language models only), as files
        (gradio_client.handle_file(PATH)) or image data URLs (data:image/png;base64,...)."""
        return _checked(lambda: pg.compare(prompt, model_a, model_b, system_prompt, temperature, top_p,
                                           max_new_tokens, blind, num_beams, _image_sources(images)))

    def system_prompt(model: str = "") -> str:
        """The system prompt `model` (NAME/VERSION; empty = model A) was trained with, "" if none: what the
        page pre-fills. /compare sends none unless given, so pass this as its system_prompt to answer as the
        page."""
        return _checked(pg.trained_system_prompt, model)[0]

    def vote(comparison_id: str, verdict: str, request: gr.Request) -> dict:
        """Log a vote (a, b, tie, both_bad) on a comparison to MLflow; reveals both models. With --trace, also
        thumbs up/down on both answers' traces."""
        return _checked(pg.vote, comparison_id, verdict, _user(request))

    def summary() -> list:
        """Win rates per pair of versions: rows of [model, vs, votes, wins, losses, ties, both bad, win
        rate]."""
        return _checked(pg.summary)

    def promote(version: str, alias: str = "", request: gr.Request = None) -> str:
        """Gated promotion of a version (NAME/VERSION), as `mlflow-finetune promote` does it."""
        return _checked(pg.promote, version, alias, _user(request))

    gr.api(compare, api_name="compare")
    gr.api(system_prompt, api_name="system_prompt", concurrency_limit=None)
    gr.api(vote, api_name="vote", concurrency_limit=None)
    gr.api(summary, api_name="summary", concurrency_limit=None)
    gr.api(promote, api_name="promote", concurrency_limit=1)




def _label(pg: Playground, key: str | None, blind: bool, index: int) -> str:
    if blind or not key:
        return _BLIND_LABELS[index]
    try:
        return f"{_BLIND_LABELS[index][-1]}: {pg.label(key)}"
    except FinetuneError:
        return _BLIND_LABELS[index]


def _image_sources(images) -> list[str]:
    """The `compare` endpoint's images as what `store_image` reads: files uploaded through Gradio (FileData,
    which Gradio checked are in its upload folder) as their paths, data URLs as they are. Anything else is
    refused: a client names no file on this machine."""
    from gradio.utils import get_upload_folder, is_in_or_equal

    sources = []
    for item in images or []:
        if (
            isinstance(item, dict)
            and isinstance(item.get("path"), str)
            and is_in_or_equal(item["path"], get_upload_folder())
        ):
            sources.append(item["path"])
        elif isinstance(item, str) and item[:11].lower() == "data:image/":
            sources.append(item)
        else:
            shown = str(item if not isinstance(item, dict) else item.get("path"))[:60]
            raise FinetuneError(
                f"images: {shown!r} is neither an uploaded file nor an image data URL: send files "
                "with gradio_client.handle_file(PATH), or data:image/png;base64,... strings")
    return sources


def _board_note(rows) -> str:
    """What the leaderboard says under an empty table (rows: a list, or the page's DataFrame): how to fill
    it."""
    return EMPTY_LEADERBOARD if rows is None or len(rows) == 0 else ""


def _plain(history) -> list[dict]:
    """Chatbot history (content may arrive as a list of parts) as role/content text messages; error notes keep
    their metadata, which keeps them out of what the models are sent next turn."""
    from mlflow_finetune_plugin.messages import text_of

    def shown(content):  # a user message's images stay in the pane, before its text
        files = pane_files(content)
        return [*({"path": f} for f in files), text_of(content)] if files else text_of(content)

    return [{"role": m["role"], "content": shown(m.get("content")),
             **({"metadata": m["metadata"]} if (m.get("metadata") or {}).get("title") else {})}
            for m in history or [] if m.get("role") in ("user", "assistant")]


def _answer(text: str, error: str | None) -> dict:
    """A pane's answer; a failure is shown as a titled note (Playground.context leaves titled messages
    out)."""
    if error:
        return {"role": "assistant", "content": f"{text}\n\n{error}".strip(),
                "metadata": {"title": "⚠️ This model failed"}}
    return {"role": "assistant", "content": text}


def _comparison(pg, running, contexts, texts, settings, is_blind, traces):
    from mlflow_finetune_plugin.arena.votes import Comparison

    return Comparison(pg.names[0], running[0], running[1], contexts[0], contexts[1], texts[0].strip(),
                      texts[1].strip(), settings.as_dict(), bool(is_blind), traces=list(traces))


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860,
           auth: tuple[str, str] | None = None, block: bool = True, quiet: bool = False):
    """Serve the page on host:port (127.0.0.1 unless asked otherwise); returns gradio's (app, local_url,
    share_url)."""
    return demo.launch(server_name=host, server_port=port, auth=auth, prevent_thread_lock=not block,
                       show_error=True, quiet=quiet, share=False, css=_CSS, footer_links=["api"],
                       # uploads are images: larger ones are refused as they arrive
                       max_file_size=MAX_IMAGE_BYTES)
