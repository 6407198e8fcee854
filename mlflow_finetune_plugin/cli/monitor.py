"""`mlflow-finetune monitor`: how served versions are doing, per window; --retrain trains the next one."""

from __future__ import annotations

import contextlib
import os
import sys

import click


@click.command("monitor", short_help="Watch served versions per window; alert, retrain.")
@click.argument("name")
@click.option("--experiment", "-x", "experiments", multiple=True, metavar="EXPERIMENT",
              help="Experiment the traffic is traced to (`serve --trace EXPERIMENT`); repeatable. Default: "
                   "every experiment in the store.")
@click.option("--window", default=None, metavar="N[s|m|h|d|w]",
              help="Window length: any whole number of seconds, minutes, hours, days or weeks (30s, 15m, 2h, "
                   "1d, 1w). Default: the recipe's monitor.window (1d).")
@click.option("--since", default=None, help="Traffic from this moment: an ISO date/time or a duration ago "
                                            "(7d, 12h).")
@click.option("--until", default=None, help="Traffic before this moment (the same forms).")
@click.option("--gate", "gates", multiple=True, metavar="METRIC<=X|METRIC>=X",
              help="A limit on a window's metric, replacing the recipe's monitor.gates; repeatable. "
                   "E.g. --gate novel_share<=0.3 --gate thumbs_down_share<=0.2")
@click.option("--min-requests", type=click.IntRange(min=1), default=None,
              help="Windows with fewer requests of a version are never an alert. Default: the recipe's "
                   "monitor.min_requests (20).")
@click.option("--examples", is_flag=True, help="Show the requests' texts beside the trace ids of alerts and "
                                               "new topics (traces hold user data: off by default).")
@click.option("--embedding", default=None, metavar="MODEL",
              help="A sentence-transformers model (hub id or folder) to measure drift with, instead of BM25. "
                   "Default: the recipe's monitor.embedding.")
@click.option("--judge", default=None, metavar="MODEL",
              help="An LLM judge's pass rate per window (judge_pass), through MLflow's judges: "
                   "gateway:/ENDPOINT (the tracking server's AI Gateway) or an OpenAI-compatible URL "
                   "http://HOST:PORT/v1. Each verdict is stored on its trace (docs/monitoring.md).")
@click.option("--judge-model", default=None, metavar="NAME",
              help="The model to ask for at the --judge URL. Default: the first its /models lists.")
@click.option("--judge-instructions", default=None, metavar="TEXT",
              help="The judge's criteria, naming {{ inputs }} (the request) and {{ outputs }} (the answer); "
                   "it returns true or false. Default: does the answer respond to the request, correct, on "
                   "topic, complete.")
@click.option("--start", "start_online", is_flag=True,
              help="Register the --judge on the traffic experiments, where `mlflow server` judges new traces "
                   "as they arrive (online); then `monitor NAME` shows its judge_pass.")
@click.option("--stop", "stop_online", is_flag=True, help="Stop and remove the online judge of NAME.")
@click.option("--sample-rate", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="With --start: the share of NAME's new traces the online judge judges.")
@click.option("--no-log", is_flag=True, help="Only print: log no metrics or chart to the monitoring run.")
@click.option("--retrain", is_flag=True, help="Then train the next version on the champion's training data "
                                              "plus its traffic's corrected and thumbs-up answers (and a "
                                              "distill.teacher's answers to drifted requests), and promote "
                                              "it only if it beats the champion on held-out traffic and "
                                              "passes the recipe's gates.")
@click.option("--keep", is_flag=True, help="With --retrain: keep the run's temporary project folder (its "
                                           "recipe and rows, users' words among them) and say where; removed "
                                           "after the run by default.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the outcome as one JSON object on stdout (the exit code, alerts, what --retrain "
                   "trained and compared); everything else goes to stderr.")
@click.option("-P", "params", multiple=True, metavar="KEY=VALUE",
              help="Recipe override for the --retrain run.")
@click.option("--backend-config", "-b", default=None, metavar="JSON",
              help="The --retrain run's backend config.")
def monitor_cmd(name, experiments, window, since, until, gates, min_requests, examples, embedding, judge,
                judge_model, judge_instructions, start_online, stop_online, sample_rate, no_log, retrain,
                keep, as_json, params, backend_config):
    """How the served versions of registered model NAME are doing, per time window: requests, errors, latency,
    tokens, answers cut at the length limit, feedback and thumbs-down, quality against users' corrections, and
    drift (requests far from the training questions, new topics, length and language). A window over a monitor
    gate is an alert: named, with example traces. Exit codes, for cron and CI (docs/monitoring.md): 0 no
    alert, 3 an alert and nothing retrained, 4 retrained and promoted, 5 retrained and kept on @challenger,
    1 failed, 2 a usage error."""
    from mlflow_finetune_plugin.config.monitor import window_seconds

    if window is not None:
        try:
            window_seconds(window)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--window") from None
    if start_online and stop_online:
        raise click.UsageError("--start and --stop: give one")
    if as_json and (start_online or stop_online):
        raise click.UsageError("--json reports a monitoring pass; --start and --stop print what they did")
    if keep and not retrain:
        raise click.UsageError("--keep keeps the project of a --retrain run: give --retrain")
    if start_online or stop_online:  # registering or removing the online judge is the whole command
        from mlflow_finetune_plugin.monitor import online

        spec = _judge(judge, judge_model, judge_instructions, ready=start_online)
        click.echo("\n".join(online.command(name, experiments, spec, start_online, sample_rate)))
        return
    run = dict(window=window, since=since, until=until, gates=gates, min_requests=min_requests,
               judge=(judge, judge_model, judge_instructions), no_log=no_log, embedding=embedding,
               examples=examples, retrain=(params, backend_config, keep) if retrain else None)
    if not as_json:
        sys.exit(_pass(name, experiments, **run)[0])
    import json
    import traceback

    from mlflow_finetune_plugin.errors import FinetuneError
    from mlflow_finetune_plugin.monitor.outcome import as_dict

    with _stdout_to_stderr():
        try:
            code, found = _pass(name, experiments, **run)
        except Exception as e:  # noqa: BLE001 (a scheduler reads the failure from the JSON and exit code 1)
            if not isinstance(e, FinetuneError):
                traceback.print_exc()
            click.secho(f"Error: {e}", fg="red", err=True)
            code, found = 1, as_dict(name, None, error=str(e))
    # numpy scalars among the figures print as numbers
    click.echo(json.dumps(found, indent=2, default=lambda o: float(o) if hasattr(o, "__float__") else str(o)))
    sys.exit(code)


def _judge(judge, judge_model, judge_instructions, ready: bool):
    """The --judge's spec (None without one), asked whether it answers when `ready`: a judge that cannot is
    refused before any traffic is read, even none."""
    from mlflow_finetune_plugin.errors import FinetuneError
    from mlflow_finetune_plugin.monitor.judge import ready as answering
    from mlflow_finetune_plugin.monitor.judge import spec_of

    if (judge_model or judge_instructions) and not judge:
        raise FinetuneError("--judge-model and --judge-instructions describe a --judge MODEL: give it")
    spec = spec_of(judge, judge_model, judge_instructions) if judge else None
    return answering(spec) if spec and ready else spec


def _limits(gates):
    """The --gate limits, None without any."""
    from mlflow_finetune_plugin.config.monitor import check_gate_metric
    from mlflow_finetune_plugin.errors import FinetuneError
    from mlflow_finetune_plugin.registry.promotion import parse_gate

    limits = [parse_gate(g) for g in gates] if gates else None
    for gate, given in zip(limits or [], gates):
        try:
            check_gate_metric(gate.metric)
        except ValueError as e:
            raise FinetuneError(f"--gate {given}: {e}") from None
        if gate.at_most is None and gate.at_least is None:
            raise FinetuneError(f"--gate {given}: a monitor gate is a limit, METRIC<=X or METRIC>=X "
                                "(e.g. novel_share<=0.3)")
    return limits


def _pass(name, experiments, window, since, until, gates, min_requests, judge, no_log, embedding, examples,
          retrain) -> tuple[int, dict]:
    """One monitoring pass, printed (and --retrain's run): (its exit code, its --json object)."""
    from mlflow_finetune_plugin.monitor import report as out
    from mlflow_finetune_plugin.monitor.outcome import EXIT_CODES, SAID, as_dict
    from mlflow_finetune_plugin.monitor.watch import watch

    limits, spec = _limits(gates), _judge(*judge, ready=True)
    report = watch(name, experiments, window, since, until, limits, min_requests, spec,
                   store_judgments=not no_log, embedding=embedding)
    click.echo(out.text(report, examples))
    run_id = None
    if not no_log and (run_id := out.log(report)):
        click.echo(f"\nLogged to the monitoring run {run_id} (metrics {out.PREFIX}vN/..., "
                   f"chart {out.CHART_FILE}).")
    retrained = None
    if retrain:
        import json

        from mlflow_finetune_plugin.monitor.retrain import retrain as train_next

        params, backend_config, keep = retrain
        overrides = dict(p.split("=", 1) for p in params if "=" in p)
        config = json.loads(backend_config) if backend_config else None
        retrained = train_next(report, name, overrides, config, click.echo, keep=keep)
    found = as_dict(name, report, retrained, run_id=run_id)
    click.echo(f"\nOutcome: {SAID[found['outcome']]} (exit {EXIT_CODES[found['outcome']]}).")
    return found["exit_code"], found


@contextlib.contextmanager
def _stdout_to_stderr():
    """Everything printed, by this process and the runs it starts, goes to stderr; stdout is left for the
    JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
