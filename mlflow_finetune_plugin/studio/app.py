"""The studio page (gr.Blocks): Train (project or uploads, model, entry point, the recipe's keys, the check,
the command line and finetune.yaml it amounts to, Start), Runs (live charts, log, Stop/Resume, then the
verdict against every prompt-only contender, the answers, Chat and Promote) and History (the runs, two
compared)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.studio.recipe_form import runnable_model, start_project
from mlflow_finetune_plugin.studio.views import (
    CHARTS,
    DATA_SUFFIXES,
    HISTORY_HEADERS,
    KEY_HEADERS,
    guess_files,
    history_rows,
    job_label,
    key_rows,
    overrides_of,
    plot_frame,
    records,
    status_line,
    text,
    upload_path,
)

_CSS = "#start button, #start {min-width: 8em}"


def _checked(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except FinetuneError as e:
        raise gr.Error(str(e), print_exception=False) from None


def _user_error(e: Exception) -> str:
    return f"**Not done:** {e}"


def _project_options(studio):
    return [(p.name + ("" if p.bundled else f" ({p.path})"), str(p.path)) for p in studio.projects()]


def _fields_for(studio, project: str, entry: str | None):
    from mlflow_finetune_plugin.studio.recipe_form import recipe_fields

    path = studio.project(project)
    fields = recipe_fields(path, entry)
    model_default = next((text(f.default) for f in fields if f.key == "model.name"), "")
    return path, fields, model_default


def _run_choices(studio, jobs=None):
    return [(job_label(j), j.id) for j in (studio.launcher.listed() if jobs is None else jobs)]


def _job(studio, job_id, jobs=None):
    return next((j for j in (studio.launcher.listed() if jobs is None else jobs) if j.id == job_id), None)


def build(studio, title: str = "mlflow-finetune studio") -> gr.Blocks:
    """The page: its three tabs laid out (`_train_tab`, `_runs_tab`, `_history_tab`), then their events wired
    (`_wire_*`, one function per part of a tab)."""
    ui = SimpleNamespace()  # the page's components by name, shared by the tabs' layout and their wiring
    first = start_project(_project_options(studio))  # README command 1's recipe where it is offered
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"## {title}\nFine-tune as `mlflow run --backend finetune` does it, from this page: every run is "
            "an ordinary MLflow run, judged against prompting, chatted with, promoted through the gates.")
        ui.checked = gr.State(None)  # the inputs the last passing check saw: Start runs exactly those
        ui.model_default = gr.State("")
        ui.upload_dir = gr.State(None)
        with gr.Tabs(elem_id="tabs") as ui.tabs:
            _train_tab(ui, studio, first)
            _runs_tab(ui)
            _history_tab(ui)
        _wire_form(demo, ui, studio)
        _wire_uploads(ui, studio)
        _wire_check_start(ui, studio)
        judgements = _wire_runs(ui, studio)
        _wire_chat_promote(ui, studio, judgements)
        _wire_history(ui)
    demo.queue(default_concurrency_limit=4, max_size=64)
    return demo


def _train_tab(ui, studio, first):
    from mlflow_finetune_plugin.studio.recipe_form import MODEL_HINT, model_choices

    project_options = partial(_project_options, studio)
    with gr.Tab("Train", id="train", elem_id="tab-train"):
        with gr.Row():
            project = gr.Dropdown(project_options(), value=first, label="Project (a recipe or a folder)",
                                  elem_id="project", scale=3)
            entry = gr.Dropdown([], label="Entry point (method)", elem_id="entry", scale=1)
            model = gr.Dropdown(_checked(model_choices), label="Model", info=MODEL_HINT,
                                allow_custom_value=True, elem_id="model", scale=3)
        with gr.Accordion("Or upload your data (JSONL, CSV, Parquet; images beside the rows that name "
                          "them)", open=False, elem_id="upload-box"):
            uploads = gr.File(file_count="multiple", label="Data files", elem_id="uploads")
            with gr.Row():
                train_pick = gr.Dropdown([], label="Training file", elem_id="train-file")
                eval_pick = gr.Dropdown([], label="Held-out file (optional)", elem_id="eval-file")
            upload_note = gr.Markdown(elem_id="upload-note")
        with gr.Accordion("Recipe keys (edit the value column; the rest is the schema's default and help)",
                          open=False, elem_id="keys-box"):
            keys = gr.Dataframe(headers=KEY_HEADERS, datatype=["str"] * 5, interactive=True,
                                static_columns=[0, 2, 3, 4], wrap=True, max_height=460, elem_id="keys")
        with gr.Row():
            check_btn = gr.Button("Check", variant="secondary", elem_id="check")
            start_btn = gr.Button("Start", variant="primary", interactive=False, elem_id="start")
        check_out = gr.Markdown("Check the recipe and the data before starting.", elem_id="check-out")
        with gr.Accordion("The same run from a terminal", open=False, elem_id="terminal-box"):
            command = gr.Code(language="shell", label="mlflow run", elem_id="command", interactive=False)
            recipe_yaml = gr.Code(language="yaml", label="finetune.yaml it amounts to", elem_id="yaml",
                                  interactive=False)
        start_out = gr.Markdown(elem_id="start-out")
        queue_table = gr.Dataframe(headers=["job", "state", "project", "entry point", "run"],
                                   interactive=False, label="Queue (one run at a time by default)",
                                   elem_id="queue")
    vars(ui).update(project=project, entry=entry, model=model, uploads=uploads, train_pick=train_pick)
    vars(ui).update(eval_pick=eval_pick, upload_note=upload_note, keys=keys, check_btn=check_btn)
    vars(ui).update(start_btn=start_btn, check_out=check_out, command=command, recipe_yaml=recipe_yaml)
    vars(ui).update(start_out=start_out, queue_table=queue_table)


def _runs_tab(ui):
    with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
        with gr.Row():
            run_pick = gr.Dropdown([], label="Run", elem_id="run-pick", scale=4)
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
            resume_btn = gr.Button("Resume", elem_id="resume", scale=1)
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            plots = {name: gr.LinePlot(x="step", y="value", title=label, label=label, height=220,
                                       elem_id=f"plot-{name.replace('_', '-')}")
                     for name, label in CHARTS[:2]}
        with gr.Row():
            plots.update({name: gr.LinePlot(x="step", y="value", title=label, label=label, height=220,
                                            elem_id=f"plot-{name.replace('_', '-')}")
                          for name, label in CHARTS[2:]})
        points = gr.Markdown(elem_id="points")
        with gr.Accordion("Log (the last lines)", open=False):
            log = gr.Code(label="log", elem_id="log", interactive=False)
        judged = gr.Markdown(elem_id="judgement")
        examples = gr.Dataframe(interactive=False, label="Answers per example", wrap=True, max_height=360,
                                elem_id="examples")
        with gr.Accordion("Chat with it (the A/B playground) and promote it", open=True):
            with gr.Row():
                against = gr.Radio(["base", "champion"], value="base", label="Against", elem_id="against")
                blind = gr.Checkbox(label="Blind", elem_id="chat-blind")
                chat_btn = gr.Button("Chat", elem_id="chat")
            chat_out = gr.Markdown(elem_id="chat-out")
            with gr.Row():
                force = gr.Checkbox(label="Force past failing gates", elem_id="force")
                reason = gr.Textbox(label="Reason (required with force)", elem_id="reason")
                promote_btn = gr.Button("Promote", elem_id="promote")
            promote_out = gr.Markdown(elem_id="promote-out")
        timer = gr.Timer(2.0)
    vars(ui).update(run_pick=run_pick, stop_btn=stop_btn, resume_btn=resume_btn, status=status, plots=plots)
    vars(ui).update(points=points, log=log, judged=judged, examples=examples, against=against, blind=blind)
    vars(ui).update(chat_btn=chat_btn, chat_out=chat_out, force=force, reason=reason, promote_btn=promote_btn)
    vars(ui).update(promote_out=promote_out, timer=timer)


def _history_tab(ui):
    with gr.Tab("History", id="history", elem_id="tab-history"):
        refresh = gr.Button("Refresh", size="sm", elem_id="history-refresh")
        runs_table = gr.Dataframe(headers=HISTORY_HEADERS, interactive=False, wrap=True,
                                  elem_id="history-runs")
        with gr.Row():
            cmp_a = gr.Dropdown([], label="Run A", elem_id="cmp-a")
            cmp_b = gr.Dropdown([], label="Run B", elem_id="cmp-b")
            compare_btn = gr.Button("Compare", elem_id="compare")
        diff = gr.Dataframe(headers=["key", "A", "B"], interactive=False, label="Settings that differ",
                            elem_id="diff")
        metrics = gr.Dataframe(headers=["metric", "A", "B"], interactive=False, label="Metrics",
                               elem_id="cmp-metrics")
        cmp_plot = gr.LinePlot(x="step", y="value", color="series", title="Training loss", height=260,
                               elem_id="cmp-plot")
    vars(ui).update(refresh=refresh, runs_table=runs_table, cmp_a=cmp_a, cmp_b=cmp_b, compare_btn=compare_btn)
    vars(ui).update(diff=diff, metrics=metrics, cmp_plot=cmp_plot)


def _wire_form(demo, ui, studio):
    fields_for = partial(_fields_for, studio)
    project, entry, model, keys, start_btn = ui.project, ui.entry, ui.model, ui.keys, ui.start_btn
    check_out, checked, model_default = ui.check_out, ui.checked, ui.model_default

    # ---- Train: the form
    def on_project(project_value, _entry_value):
        try:
            path, fields, default_model = fields_for(project_value, None)
        except FinetuneError as e:
            return (gr.update(), gr.update(), gr.update(), "", _user_error(e), gr.update(interactive=False),
                    None)
        points = [p for p in studio.projects() if str(p.path) == str(path)]
        entries = points[0].entry_points if points else []
        chosen = entries[0] if entries else None  # the recipe's own method: a new project starts on it
        if chosen:
            path, fields, default_model = fields_for(project_value, chosen)
        return (gr.update(choices=entries, value=chosen), gr.update(value=runnable_model(default_model)),
                key_rows(fields),
                default_model, "Check the recipe and the data before starting.", gr.update(interactive=False),
                None)

    project_outputs = [entry, model, keys, model_default, check_out, start_btn, checked]
    # The form's events run one at a time, in order ("form"): a slower earlier one (the page's first load)
    # must not land after a later one and leave the keys of another project under this one's name.
    form = {"concurrency_id": "form", "concurrency_limit": 1, "trigger_mode": "always_last"}
    project.change(on_project, [project, entry], project_outputs, api_visibility="private", **form)
    demo.load(on_project, [project, entry], project_outputs, api_visibility="private", **form)

    def on_entry(project_value, entry_value):
        try:
            _, fields, default_model = fields_for(project_value, entry_value)
        except FinetuneError as e:
            return gr.update(), gr.update(), _user_error(e), gr.update(interactive=False), None
        return key_rows(fields), default_model, "Check the recipe and the data before starting.", \
            gr.update(interactive=False), None

    entry.input(on_entry, [project, entry], [keys, model_default, check_out, start_btn, checked], **form,
                api_visibility="private")

    def invalidate():
        return gr.update(interactive=False), None

    for trigger in (keys.input, model.input, model.change):
        trigger(invalidate, None, [start_btn, checked], api_visibility="private", queue=False)


def _wire_uploads(ui, studio):
    project_options = partial(_project_options, studio)
    project, uploads, train_pick, eval_pick = ui.project, ui.uploads, ui.train_pick, ui.eval_pick
    upload_note, upload_dir = ui.upload_note, ui.upload_dir

    # ---- Train: uploads
    def on_upload(files, project_value, last):
        if not files:
            return gr.update(), gr.update(), gr.update(), None, "", None
        latest = {}  # the file box keeps earlier uploads: a file uploaded again (fixed) replaces its namesake
        for f in files:
            latest[upload_path(f).name.lower()] = upload_path(f)
        signature = sorted(str(p) for p in latest.values())
        if signature == last:  # the same files announced again (the box fires once per finished file)
            return gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), last
        try:
            folder = studio.workspace.save_uploads(list(latest.values()))
        except FinetuneError as e:
            return gr.update(), gr.update(), gr.update(), None, _user_error(e)
        data = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in DATA_SUFFIXES)
        if not data:
            return gr.update(), gr.update(), gr.update(), str(folder), _user_error(
                "none of the files is a data file (.jsonl, .json, .csv, .parquet)"), signature
        train, held_out = guess_files(data)
        made = _made_project(folder, project_value, train, held_out)
        if isinstance(made, str):
            return gr.update(), gr.update(), gr.update(), str(folder), made, signature
        return (gr.update(choices=data, value=train), gr.update(choices=["", *data], value=held_out or ""),
                gr.update(choices=project_options(), value=str(made)), str(folder),
                f"Uploaded {', '.join(data)} into a new project: {made.name} (based on "
                f"{_base_of(made).name}).", signature)

    def _base_of(project: Path) -> Path:
        """A project made from uploads stands for its base recipe: new uploads start from that base again."""
        if project.parent == studio.workspace.root / "projects" and (project / ".base").is_file():
            return studio.project((project / ".base").read_text().strip())
        return project

    def _made_project(folder, base_value, train, eval_file):
        try:
            base = _base_of(studio.project(base_value))
            made = studio.workspace.project_from_uploads(folder, base, train, eval_file or None)
            (made / ".base").write_text(str(base))
            return made
        except FinetuneError as e:
            return _user_error(e)

    uploaded = gr.State(None)  # the files of the last upload handled
    uploads.upload(on_upload, [uploads, project, uploaded],
                   [train_pick, eval_pick, project, upload_dir, upload_note, uploaded],
                   api_visibility="private", concurrency_limit=1)

    def on_pick(train, eval_file, folder, project_value):
        if not folder or not train:
            return gr.update(), ""
        made = _made_project(studio.workspace.resolve(folder), project_value, train, eval_file)
        if isinstance(made, str):
            return gr.update(), made
        return gr.update(
            choices=project_options(), value=str(made)
        ), f"Project {made.name}: trains on {train}" + (f", holds out {eval_file}" if eval_file else "") + "."

    for trigger in (train_pick.input, eval_pick.input):
        trigger(on_pick, [train_pick, eval_pick, upload_dir, project], [project, upload_note],
                api_visibility="private")


def _wire_check_start(ui, studio):
    from mlflow_finetune_plugin.studio import checks
    from mlflow_finetune_plugin.studio.recipe_form import command_line, effective_yaml, shell_line

    fields_for = partial(_fields_for, studio)
    project, entry, model, keys, check_btn = ui.project, ui.entry, ui.model, ui.keys, ui.check_btn
    start_btn, check_out, command, recipe_yaml = ui.start_btn, ui.check_out, ui.command, ui.recipe_yaml
    start_out, run_pick, checked, model_default = ui.start_out, ui.run_pick, ui.checked, ui.model_default

    # ---- Train: check, start
    def on_check(project_value, entry_value, model_value, rows, default_model):
        try:
            path, fields, _ = fields_for(project_value, entry_value)
            overrides = overrides_of(fields, rows, model_value, default_model)
            path = studio.workspace.check_request(path, overrides)
            result = checks.check(path, entry_value, overrides)
            params, argv = command_line(path, entry_value, overrides, studio.config.backend_config,
                                        studio.config.experiment)  # what Start queues, as it runs it
            text = effective_yaml(path, entry_value, overrides) if result.recipe_ok else \
                "# the recipe does not validate: see the problems above"
        except FinetuneError as e:
            return _user_error(e), "", "", gr.update(interactive=False), None
        signature = [str(path), entry_value, params] if result.ok else None
        return (result.as_markdown(), shell_line(argv), text, gr.update(interactive=result.ok), signature)

    check_btn.click(on_check, [project, entry, model, keys, model_default],
                    [check_out, command, recipe_yaml, start_btn, checked], api_name="check",
                    concurrency_limit=2)

    def on_start(signature):
        if not signature:
            return _user_error("check first: Start runs what the last passing check saw"), \
                gr.update(interactive=False), gr.update()
        path, entry_value, params = signature
        job = _checked(studio.launcher.submit, studio.project(path), entry_value, params,
                       studio.config.experiment)
        return (f"Queued as job `{job.id}`: `{shell_line(job.argv)}`. Follow it on the Runs tab.",
                gr.update(interactive=False), gr.update(choices=_run_choices(studio), value=job.id))

    start_btn.click(on_start, [checked], [start_out, start_btn, run_pick], api_name="start",
                    concurrency_limit=1)


def _wire_runs(ui, studio):
    """The Runs tab's watch, Stop and Resume; returns the judgements it caches, read by chat and promote."""
    from mlflow_finetune_plugin.studio import watch

    queue_table, run_pick, stop_btn, resume_btn = ui.queue_table, ui.run_pick, ui.stop_btn, ui.resume_btn
    status, plots, points, log, judged = ui.status, ui.plots, ui.points, ui.log, ui.judged
    examples, chat_out, timer = ui.examples, ui.chat_out, ui.timer

    judgements: dict[str, object] = {}

    def on_tick(job_id, known):
        jobs = studio.launcher.listed()  # the job records and runs started elsewhere, read once a tick
        choices = _run_choices(studio, jobs)
        pick = gr.update(choices=choices) if choices != known else gr.update()
        if not job_id and jobs:  # a page opened, or reopened, shows the newest run rather than no run
            job_id = jobs[0].id
            pick = gr.update(choices=choices, value=job_id)
        queue_rows = [[j.id[:8], j.state, Path(j.project).name, j.entry_point, j.run_id or ""] for j in jobs]
        job = _job(studio, job_id, jobs) if job_id else None
        if job is None:
            return (pick, choices, queue_rows, "Pick a run.", *[gr.update()] * len(plots), "", "",
                    gr.update(), gr.update())
        if not job.run_id:
            note = f"**{job.state}**" + (f": {job.error}" if job.error else " (waiting for its turn)")
            return (pick, choices, queue_rows, note, *[gr.update()] * len(plots), "", "", gr.update(),
                    gr.update())
        p = watch.progress(job.run_id)
        frames = [plot_frame(p.charts.get(name, []), name) for name in plots]
        counts = ", ".join(f"{name}: {len(p.charts.get(name, []))} points" for name in plots)
        line = status_line(p) + (f"\n\n**Failed:** {p.error}" if p.error else "")
        verdict, rows = gr.update(), gr.update()
        if p.status == "FINISHED":
            if job.run_id not in judgements:
                judgements[job.run_id] = watch.judgement(job.run_id)
            j = judgements[job.run_id]
            verdict = j.as_markdown()
            headers, values = records(j.examples)
            rows = gr.update(value=values, headers=headers) if headers else gr.update()
        return (pick, choices, queue_rows, line, *frames, counts, p.log_tail or "", verdict, rows)

    known_choices = gr.State([])
    tick_outputs = [run_pick, known_choices, queue_table, status, *plots.values(), points, log, judged,
                    examples]
    timer.tick(on_tick, [run_pick, known_choices], tick_outputs, api_visibility="private",
               concurrency_limit=None, show_progress="hidden")
    run_pick.change(on_tick, [run_pick, known_choices], tick_outputs, api_visibility="private")

    def on_stop(job_id):
        job = _job(studio, job_id)
        if job is None:
            return "Pick a run."
        _checked(studio.launcher.stop, job.id)
        return f"Stopping job `{job.id[:8]}`" + (f" (run {job.run_id}): it ends KILLED, its checkpoints kept."
                                                if job.run_id else ": it leaves the queue.")

    stop_btn.click(on_stop, [run_pick], [chat_out], api_name="stop")

    def on_resume(job_id):
        job = _job(studio, job_id)
        if job is None or not job.run_id:
            return "Pick a run that started.", gr.update()
        try:  # said where the user looks (a run stopped before its first whole checkpoint cannot resume)
            new = studio.launcher.resume(job.run_id)
        except FinetuneError as e:
            return _user_error(e), gr.update()
        return f"Resuming run {job.run_id} from its last checkpoint as job `{new.id[:8]}`.", \
            gr.update(choices=_run_choices(studio), value=new.id)

    resume_btn.click(on_resume, [run_pick], [chat_out, run_pick], api_name="resume")
    return judgements


def _wire_chat_promote(ui, studio, judgements):
    from mlflow_finetune_plugin.studio import watch

    run_pick, against, blind, chat_btn, chat_out = ui.run_pick, ui.against, ui.blind, ui.chat_btn, ui.chat_out
    force, reason, promote_btn, promote_out = ui.force, ui.reason, ui.promote_btn, ui.promote_out

    # ---- Runs: chat and promote
    def _model_of(job_id) -> str:
        job = _job(studio, job_id)
        if job is None or not job.run_id:
            raise FinetuneError("pick a finished run")
        j = judgements.get(job.run_id) or watch.judgement(job.run_id)
        if not j.model:
            raise FinetuneError(
                f"run {job.run_id} registered no model (registry.enabled false, or it did not "
                "finish)")
        return j.model

    def on_chat(job_id, side, is_blind, request: gr.Request):
        try:
            uri = _model_of(job_id)
            ref = uri.removeprefix("models:/")
            other = "base" if side == "base" else f"{ref.split('/')[0]}@champion"
            port = studio.chats.open(ref, other, bool(is_blind))
        except FinetuneError as e:
            return _user_error(e)
        host = (request.headers.get("host", "") if request else "").rsplit(":", 1)[0] or "127.0.0.1"
        url = f"http://{host}:{port}/"
        return f"The A/B playground on **{ref}** against **{other}**{' (blind)' if is_blind else ''}: " \
               f"[open it]({url}) <span id='chat-url'>{url}</span>"

    chat_btn.click(on_chat, [run_pick, against, blind], [chat_out], api_name="chat", concurrency_limit=1)

    def on_promote(job_id, is_forced, why):
        try:
            result = watch.promote(_model_of(job_id), force=bool(is_forced), reason=why or None)
        except FinetuneError as e:
            return _user_error(e)
        return f"```\n{result.report()}\n```"

    promote_btn.click(on_promote, [run_pick, force, reason], [promote_out], api_name="promote",
                      concurrency_limit=1)


def _wire_history(ui):
    from mlflow_finetune_plugin.studio import history

    refresh, runs_table, cmp_a, cmp_b = ui.refresh, ui.runs_table, ui.cmp_a, ui.cmp_b
    compare_btn, diff, metrics, cmp_plot, tabs = ui.compare_btn, ui.diff, ui.metrics, ui.cmp_plot, ui.tabs

    # ---- History
    def on_refresh():
        summaries = history.runs()
        ids = [(f"{s.name or s.run_id[:8]} · {s.run_id[:8]}", s.run_id) for s in summaries]
        return history_rows(summaries), gr.update(choices=ids), gr.update(choices=ids)

    refresh.click(on_refresh, None, [runs_table, cmp_a, cmp_b], api_name="history")
    tabs.select(on_refresh, None, [runs_table, cmp_a, cmp_b], api_visibility="private")

    def on_compare(a, b):
        if not a or not b:
            return gr.update(), gr.update(), gr.update()
        c = _checked(history.compare, a, b)
        diff_rows = [[k, text(v[0]), text(v[1])] for k, v in {**c.params, **c.only_one}.items()]
        metric_rows = [[k, text(v[0]), text(v[1])] for k, v in c.metrics.items()]
        import pandas as pd

        series = c.charts.get("loss", ([], []))
        frames = [plot_frame(series[i], f"{'AB'[i]}: {run[:8]}") for i, run in enumerate((a, b))]
        return diff_rows, metric_rows, pd.concat(frames)

    compare_btn.click(on_compare, [cmp_a, cmp_b], [diff, metrics, cmp_plot], api_name="compare")


def launch(demo: gr.Blocks, config, auth, block: bool = True, quiet: bool = False):
    """Serve the page on the configured address (loopback unless asked); uploads over the limit are refused as
    they arrive."""
    return demo.launch(server_name=config.host, server_port=config.port, auth=auth,
                       prevent_thread_lock=not block, show_error=True, quiet=quiet, share=False, css=_CSS,
                       footer_links=["api"], max_file_size=config.max_upload_bytes)
