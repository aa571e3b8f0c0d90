"""`llamaduo`: run the embedded stack, start and follow migrations, serve models."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from llamaduo.cli.render import describe, print_outcome, result_lines, summary_table
from llamaduo.cli.settings import CliSettings, cli_settings
from llamaduo.cli.watch import report_view
from llamaduo.cli.watch import watch as watch_migration
from llamaduo.client import Client, ResumeRefused, SpecError, load_spec
from llamaduo.contract import MigrationGraduated, MigrationSpec, Progress
from llamaduo.embedded.stack import DEFAULT_SERVED_MODEL, STACK_FILE, Stack, StackConfig, read_stack_file

app = typer.Typer(help="LlamaDuo: migrate a task from a service LLM to a small local model.", no_args_is_help=True)
# soft_wrap: long lines stay whole in logs and pipes; event lines carry brackets, so no markup in them.
console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

StateDir = Annotated[Path, typer.Option("--state-dir", help="Where the embedded stack keeps its data and logs.")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _stack_config(state_dir: Path) -> StackConfig:
    # Anything already configured in the environment is used instead of being started.
    return StackConfig(
        state_dir=state_dir,
        nats_url=os.environ.get("LLAMADUO_NATS_URL"),
        store_url=os.environ.get("LLAMADUO_STORE_URL"),
        service_llm_base_url=os.environ.get("LLAMADUO_SERVICE_LLM_BASE_URL"),
        service_llm_model=os.environ.get("LLAMADUO_SERVICE_LLM_MODEL"),
    )


def _stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so `with Stack(...)` stops everything it started."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@app.command()
def up(
    state_dir: StateDir = Path(".llamaduo"),
    detach: Annotated[bool, typer.Option(help="Start in the background and return once ready.")] = False,
) -> None:
    """Start the embedded stack: nats-server, the local service LLM and the five services."""
    if read_stack_file(state_dir):
        raise _fail(f"a stack already runs from {state_dir} (run `llamaduo down --state-dir {state_dir}` first)")
    if detach:
        state_dir.mkdir(parents=True, exist_ok=True)
        with (state_dir / "up.log").open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "llamaduo", "up", "--state-dir", str(state_dir)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            info = read_stack_file(state_dir)
            if info and info.get("ready"):
                console.print(f"stack ready (pid {process.pid}); NATS {info['nats_url']}, logs in {info['logs']}")
                return
            if process.poll() is not None:
                raise _fail(f"the stack exited during start-up; see {state_dir / 'up.log'}")
            time.sleep(0.5)
        raise _fail("the stack did not become ready in 10 minutes")
    stack = Stack(_stack_config(state_dir))
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with stack:
        stack.wait_ready()
        stack.mark_ready()
        console.print(f"stack up: NATS {stack.nats_url}, store {stack.store_url}, LLM {stack.service_llm_base_url}")
        while not stopping:
            stack.check()
            time.sleep(0.5)
    console.print("stack stopped")


@app.command()
def down(state_dir: StateDir = Path(".llamaduo")) -> None:
    """Stop a stack started with `llamaduo up --detach`."""
    info = read_stack_file(state_dir)
    if not info:
        raise _fail(f"no running stack in {state_dir}")
    pid = int(str(info["pid"]))
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        (state_dir / STACK_FILE).unlink(missing_ok=True)
        console.print("the stack was not running; cleaned up its file")
        return
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and read_stack_file(state_dir):
        time.sleep(0.3)
    console.print("stack stopped")


async def _migrate(settings: CliSettings, spec: MigrationSpec, migration_id: str | None, watch: bool) -> int:
    async with Client(settings, settings) as client:
        since = datetime.now(UTC)
        migration_id = await client.submit(spec, migration_id)
        console.print(f"migration [bold]{migration_id}[/bold] requested")
        if not watch:
            console.print(f"follow it with: llamaduo status {migration_id}")
            return 0
        graduated = False
        last_progress = ""
        async for event in client.follow(migration_id, since):
            line = describe(event)
            if isinstance(event, Progress):
                # Progress lines are many; show one per stage change or every tenth step.
                key = f"{event.service}{event.stage}"
                if key == last_progress and event.done % 10 and event.done != event.total:
                    continue
                last_progress = key
            if line:
                console.print(f"{datetime.now().strftime('%H:%M:%S')}  {line}", markup=False)
            graduated = graduated or isinstance(event, MigrationGraduated)
        state = await client.status(migration_id)
        if state:
            print_outcome(console, state)
        return 0 if graduated else 3


@app.command()
def migrate(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Migration spec (YAML).")],
    migration_id: Annotated[str | None, typer.Option("--id", help="Migration id (default: generated).")] = None,
    watch: Annotated[bool, typer.Option(help="Follow the migration until it ends.")] = False,
) -> None:
    """Request a migration (and with --watch, follow it to graduated or failed)."""
    try:
        spec = load_spec(spec_path)
    except SpecError as exc:
        raise _fail(str(exc)) from None
    code = asyncio.run(_migrate(cli_settings(), spec, migration_id, watch))
    raise typer.Exit(code)


@app.command()
def demo(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC")] = Path("examples/commit-message/spec.yaml"),
    state_dir: StateDir = Path(".llamaduo/demo"),
) -> None:
    """Start the embedded stack, run one migration to its end, print where the results are, stop the stack."""
    try:
        spec = load_spec(spec_path)
    except SpecError as exc:
        raise _fail(str(exc)) from None
    started = time.monotonic()
    _stop_on_sigterm()
    with Stack(_stack_config(state_dir)) as stack:
        console.print(f"embedded stack started (logs in {stack.logs_dir}); waiting for the local service LLM")
        stack.wait_ready()
        failure: list[Exception] = []

        def on_failure(exc: Exception) -> None:
            failure.append(exc)
            os.kill(os.getpid(), signal.SIGINT)  # stop following; `with Stack` then stops everything

        supervisor = stack.supervise(on_failure)
        settings = CliSettings(nats_url=stack.nats_url, store_url=stack.store_url, state_dir=state_dir)
        try:
            code = asyncio.run(_migrate(settings, spec, None, watch=True))
        except KeyboardInterrupt:
            if not failure:
                raise
            raise _fail(f"the embedded stack failed: {failure[0]}") from None
        finally:
            supervisor.set()
    console.print(f"demo finished in {time.monotonic() - started:.0f}s; everything it started is stopped")
    raise typer.Exit(0 if code in (0, 3) else code)


def _unknown(migration_id: str) -> int:
    err.print(f"[red]error:[/red] no migration {escape(repr(migration_id))}")
    return 2


async def _status(settings: CliSettings, migration_id: str) -> int:
    async with Client(settings, settings) as client:
        report = await client.status_report(migration_id)
    if report is None:
        return _unknown(migration_id)
    console.print(report_view(report, datetime.now(UTC)))
    for line in result_lines(report.state, with_spend=False):
        console.print(line, markup=False)
    return 0


@app.command()
def status(migration_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Show one migration's state, live progress and ETA, iterations, scores, spend and results."""
    raise typer.Exit(asyncio.run(_status(cli_settings(), migration_id)))


async def _list(settings: CliSettings) -> int:
    async with Client(settings, settings) as client:
        listing = await client.list_report()
    if not listing.migrations:
        console.print("no migrations")
    else:
        console.print(summary_table(listing.migrations))
    if listing.truncated:
        err.print(f"only the {len(listing.migrations)} most recently updated migrations are listed")
    if listing.note:
        err.print(listing.note, markup=False)
    return 0


@app.command(name="list")
def list_migrations() -> None:
    """List every migration: status, iteration, best scores, dollars and when it last changed."""
    raise typer.Exit(asyncio.run(_list(cli_settings())))


async def _watch(settings: CliSettings, migration_id: str, refresh_s: float) -> int:
    async with Client(settings, settings) as client:
        outcome = await watch_migration(client, migration_id, console, refresh_s=refresh_s)
    if outcome is None:
        return _unknown(migration_id)
    print_outcome(console, outcome.state)
    return 0 if outcome.state.status == "graduated" else 3


def _watching(run: Coroutine[Any, Any, int], migration_id: str) -> int:
    """Run a watching coroutine; Ctrl-C leaves the view and leaves the migration alone."""
    try:
        return asyncio.run(run)
    except KeyboardInterrupt:
        err.print(f"stopped watching; migration {migration_id} goes on (llamaduo status {migration_id})", markup=False)
        return 130


@app.command(name="watch")
def watch_command(
    migration_id: Annotated[str, typer.Argument(metavar="ID")],
    refresh: Annotated[float, typer.Option(help="Seconds between status refreshes.", min=0.5)] = 5.0,
) -> None:
    """Watch a migration live until it ends: stage progress and ETA, iterations, scores, dollars.

    Exits 0 when it graduates, 3 when it ends otherwise, 2 for an unknown id; Ctrl-C only stops watching.
    """
    raise typer.Exit(_watching(_watch(cli_settings(), migration_id, refresh), migration_id))


async def _resume(
    settings: CliSettings, migration_id: str, overrides: dict[str, object], reason: str, watch: bool
) -> int:
    async with Client(settings, settings) as client:
        before = await client.status(migration_id)
        try:
            request_id = await client.resume(migration_id, overrides, reason)
        except ResumeRefused as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}")
            return 2
        changed = ", ".join(f"{key}={value}" for key, value in overrides.items()) or "unchanged budgets"
        console.print(f"resume requested for {migration_id} ({changed}; request {request_id})", markup=False)
        if not watch:
            console.print(f"follow it with: llamaduo watch {migration_id}", markup=False)
            return 0
        resumed_after = before.spec.resumed if before is not None else 0
        outcome = await watch_migration(client, migration_id, console, resumed_after=resumed_after)
    if outcome is None:
        return _unknown(migration_id)
    if not outcome.ended:
        err.print(
            f"the coordinator has not acted on resume request {request_id} yet; "
            f"check again with: llamaduo status {migration_id}",
            markup=False,
        )
        return 4
    print_outcome(console, outcome.state)
    return 0 if outcome.state.status == "graduated" else 3


@app.command()
def resume(
    migration_id: Annotated[str, typer.Argument(metavar="ID")],
    max_iterations: Annotated[int | None, typer.Option(help="New budgets.max_iterations (iteration 0 counts).")] = None,
    max_cost_usd: Annotated[float | None, typer.Option(help="New budgets.max_cost_usd (dollars, whole run).")] = None,
    max_synthetic_rows: Annotated[int | None, typer.Option(help="New budgets.max_synthetic_rows.")] = None,
    plateau_iterations: Annotated[int | None, typer.Option(help="New budgets.plateau_iterations.")] = None,
    deadline_minutes: Annotated[float | None, typer.Option(help="New budgets.deadline_minutes.")] = None,
    reason: Annotated[str, typer.Option(help="Why (recorded with the request).")] = "resumed by user",
    watch: Annotated[bool, typer.Option(help="Watch the resumed migration until it ends.")] = False,
) -> None:
    """Resume a failed or cancelled migration from its last completed stage, optionally with new budgets.

    Budgets not given stay as they are. Exits 2 when the migration is unknown or cannot be resumed.
    """
    overrides: dict[str, object] = {
        key: value
        for key, value in {
            "max_iterations": max_iterations,
            "max_cost_usd": max_cost_usd,
            "max_synthetic_rows": max_synthetic_rows,
            "plateau_iterations": plateau_iterations,
            "deadline_minutes": deadline_minutes,
        }.items()
        if value is not None
    }
    raise typer.Exit(_watching(_resume(cli_settings(), migration_id, overrides, reason, watch), migration_id))


@app.command()
def cancel(
    migration_id: Annotated[str, typer.Argument(metavar="ID")],
    reason: Annotated[str, typer.Option(help="Why (recorded in the state).")] = "cancelled by user",
) -> None:
    """Cancel a migration: it ends `cancelled` and its pending tasks are skipped."""

    async def run() -> None:
        settings = cli_settings()
        async with Client(settings, settings) as client:
            await client.cancel(migration_id, reason)

    asyncio.run(run())
    console.print(f"cancel requested for {migration_id}")


@app.command()
def provision() -> None:
    """Create the streams, consumers and state bucket on the configured NATS (idempotent)."""
    from llamaduo.bus import provision_bus

    settings = cli_settings()
    asyncio.run(provision_bus(settings))
    console.print(f"provisioned {settings.nats_url}")


@app.command()
def bridge(
    bus: Annotated[
        str | None, typer.Option(help="kafka, rabbitmq, redis or mqtt (default: $LLAMADUO_BRIDGE_BUS).")
    ] = None,
) -> None:
    """Bridge Kafka, RabbitMQ, Redis Streams or MQTT to the migration bus (settings: LLAMADUO_BRIDGE_* variables)."""
    try:
        from llamaduo_bridge.app import main as run_bridge
    except ImportError as exc:
        raise _fail(f"`llamaduo bridge` needs the bridge service: pip install ./services/bridge ({exc})") from exc
    if bus:
        os.environ["LLAMADUO_BRIDGE_BUS"] = bus
    run_bridge()


@app.command()
def schemas(out: Annotated[Path, typer.Option(help="Output folder.")] = Path("schemas")) -> None:
    """Write the JSON Schema of every event and the AsyncAPI document."""
    from llamaduo.contract.schemas import write_schemas

    for path in write_schemas(out):
        console.print(str(path))


@app.command()
def report(
    migration_id: Annotated[str, typer.Argument(metavar="ID")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default: reports/<ID>).")] = None,
    gpu_usd_per_hour: Annotated[
        float, typer.Option(min=0.0, help="GPU rental price, for the break-even estimate.")
    ] = 2.0,
) -> None:
    """Write an HTML report of a migration (iterations, charts, examples, serving, break-even, lineage)."""
    import importlib.util

    from rich.markup import escape as escape_markup

    from llamaduo.contract import is_valid_migration_id
    from llamaduo.report import write_report_files
    from llamaduo.state import MigrationState
    from llamaduo.store import open_store

    if not is_valid_migration_id(migration_id):
        raise _fail(f"{escape_markup(repr(migration_id))} is not a migration id")
    if importlib.util.find_spec("matplotlib") is None:
        raise _fail("`llamaduo report` needs matplotlib: pip install 'llamaduo[report]'")
    settings = cli_settings()

    async def fetch() -> MigrationState | None:
        async with Client(settings, settings) as client:
            return await client.status(migration_id)

    state = asyncio.run(fetch())
    if state is None:
        raise _fail(f"no migration {migration_id!r}")
    files = write_report_files(state, open_store(settings), out or Path("reports") / migration_id, gpu_usd_per_hour)
    for path in files:
        console.print(str(path), markup=False)


@app.command()
def serve(
    model: Annotated[
        str, typer.Option(help="Base model: bundled:<name>, a directory or a hub id.")
    ] = DEFAULT_SERVED_MODEL,
    adapter: Annotated[
        list[str] | None, typer.Option(help="NAME=PATH of a PEFT adapter (directory, .tar or file:// URI); repeatable.")
    ] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_name: Annotated[str | None, typer.Option(help="Model name clients use for the base model.")] = None,
    max_batch_size: Annotated[
        int, typer.Option(min=1, help="Sequences decoded together across concurrent requests (continuous batching).")
    ] = 16,
) -> None:
    """Serve the base model and adapters over an OpenAI-compatible API (/v1/chat/completions)."""
    try:
        from llamaduo_inferencer.serve import run_server
    except ImportError:
        raise _fail("`llamaduo serve` needs the inferencer: pip install llamaduo-inferencer") from None
    from llamaduo.cli.adapters import materialise_adapters
    from llamaduo.localmodel import LocalModelSettings
    from llamaduo.telemetry import configure_logging

    configure_logging("serve", os.environ.get("LLAMADUO_LOG_LEVEL", "INFO"))
    local = LocalModelSettings()
    try:
        adapters = materialise_adapters(adapter or [], local.model_cache / "adapters")
    except ValueError as exc:
        raise _fail(str(exc)) from None
    run_server(
        model,
        host=host,
        port=port,
        adapters=adapters,
        model_cache=local.model_cache,
        served_name=served_name,
        max_batch_size=max_batch_size,
    )


def main() -> None:
    """Console entry point."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app()


__all__ = ["app", "main"]
