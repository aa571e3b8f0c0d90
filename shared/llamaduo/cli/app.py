"""`llamaduo`: run the embedded stack, start and follow migrations, serve models."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from llamaduo.cli.render import describe, print_outcome, state_table
from llamaduo.cli.settings import CliSettings, cli_settings
from llamaduo.client import Client, SpecError, load_spec
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


async def _status(settings: CliSettings, migration_id: str | None) -> int:
    async with Client(settings, settings) as client:
        if migration_id is None:
            console.print(state_table(await (await client.states()).list()))
            return 0
        state = await client.status(migration_id)
        if state is None:
            err.print(f"no migration {migration_id!r}")
            return 2
        print_outcome(console, state)
        return 0


@app.command()
def status(migration_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Show one migration's state, iterations, scores, spend and results."""
    raise typer.Exit(asyncio.run(_status(cli_settings(), migration_id)))


@app.command(name="list")
def list_migrations() -> None:
    """List every migration with its state."""
    raise typer.Exit(asyncio.run(_status(cli_settings(), None)))


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
def schemas(out: Annotated[Path, typer.Option(help="Output folder.")] = Path("schemas")) -> None:
    """Write the JSON Schema of every event and the AsyncAPI document."""
    from llamaduo.contract.schemas import write_schemas

    for path in write_schemas(out):
        console.print(str(path))


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
    run_server(model, host=host, port=port, adapters=adapters, model_cache=local.model_cache, served_name=served_name)


def main() -> None:
    """Console entry point."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app()


__all__ = ["app", "main"]
