"""The process-level chaos world: an authenticated nats-server with file storage (restartable), the S3 endpoint, the
scripted service LLM with injected faults, and the five services as separate OS processes with two replicas of every
worker (`llamaduo.embedded.stack.Stack`); plus the audits run after a schedule: events lost, work done twice, the
ledger against the service LLM's own billing log, artifacts, isolation between migrations and secrets."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from minio import Minio

from llamaduo.bus import provision_bus
from llamaduo.bus.provisioning import EVENTS_STREAM
from llamaduo.client import Client
from llamaduo.contract import EVENTS_BY_NAME, ArtifactRef, MigrationSpec
from llamaduo.embedded.stack import Child, Stack, StackConfig
from llamaduo.settings import WorkerSettings
from llamaduo.state import MigrationState
from llamaduo.store.s3 import S3Store
from tests.chaos.faults import AuthNatsServer, kill9, log_records
from tests.chaos.tally import ScenarioTally
from tests.chaos.world import refs_in, stream_messages, write_coverage
from tests.support.scripted_llm import ScriptedLLM

WORKERS = ("synthesizer", "trainer", "inferencer", "judge")
ACK_WAIT_S = 6.0
"""A dead worker's task comes back after this long; live ones send heartbeats every second."""
OUTPUTS = (
    "dataset.ready",
    "model.trained",
    "responses.ready",
    "evaluation.completed",
    "migration.need_more_data",
    "migration.graduated",
    "migration.failed",
)
"""Events that are some service's result: each must exist exactly once per (migration, iteration)."""


def marker_of(body: dict[str, Any]) -> str | None:
    """The migration marker (`[mid]`) a service-LLM request carries in its prompt text."""
    text = json.dumps(body.get("messages"))
    start = text.find("[chaos-")
    if start < 0:
        return None
    end = text.find("]", start)
    return text[start + 1 : end] if end > 0 else None


@dataclass
class Secrets:
    """Secrets the services hold; none may appear in a log line or an artifact."""

    api_key: str = field(default_factory=lambda: "sk-chaos-" + os.urandom(12).hex())
    s3_secret: str = field(default_factory=lambda: "s3-chaos-" + os.urandom(12).hex())
    nats_password: str = field(default_factory=lambda: "nats-chaos-" + os.urandom(12).hex())

    def values(self) -> dict[str, str]:
        return {"service-LLM API key": self.api_key, "S3 secret": self.s3_secret, "NATS password": self.nats_password}


class ChaosStack:
    """Everything running, and handles to hurt it."""

    def __init__(self, state_dir: Path, s3_endpoint: str, llm: ScriptedLLM, secrets: Secrets, bucket: str) -> None:
        self.state_dir = state_dir
        self.llm = llm
        self.secrets = secrets
        self.bucket = bucket
        self.s3_endpoint = s3_endpoint
        self.nats = AuthNatsServer(state_dir / "nats", state_dir / "nats-server.log", password=secrets.nats_password)
        self.settings = WorkerSettings(
            nats_url=f"nats://127.0.0.1:{self.nats.port}",
            nats_user=self.nats.user,
            nats_password=secrets.nats_password,
            store_url=f"s3://{bucket}/llamaduo",
            s3_endpoint=s3_endpoint,
            s3_access_key="chaos-access",
            s3_secret_key=secrets.s3_secret,
            ack_wait_s=ACK_WAIT_S,
            max_deliver=8,
        )
        env = {
            "LLAMADUO_NATS_USER": self.nats.user,
            "LLAMADUO_NATS_PASSWORD": secrets.nats_password,
            "LLAMADUO_S3_ENDPOINT": s3_endpoint,
            "LLAMADUO_S3_ACCESS_KEY": "chaos-access",
            "LLAMADUO_S3_SECRET_KEY": secrets.s3_secret,
            "LLAMADUO_SERVICE_LLM_API_KEY": secrets.api_key,
            # A dead worker's task comes back after ack_wait; live ones send heartbeats every second.
            "LLAMADUO_ACK_WAIT_S": str(ACK_WAIT_S),
            "LLAMADUO_HEARTBEAT_S": "1",
            "LLAMADUO_RETRY_BASE_DELAY_S": "0.3",
            "LLAMADUO_RETRY_MAX_DELAY_S": "3",
            "LLAMADUO_MAX_DELIVER": "8",
            "LLAMADUO_GRACEFUL_TIMEOUT_S": "2",
            # Timeouts are one of the injected faults: a call slower than this is given up and retried.
            "LLAMADUO_SERVICE_LLM_TIMEOUT_S": "2",
            "LLAMADUO_SERVICE_LLM_MAX_RETRIES": "12",
            "LLAMADUO_SERVICE_LLM_BACKOFF_BASE_S": "0.05",
            "LLAMADUO_SERVICE_LLM_BACKOFF_MAX_S": "0.5",
            "LLAMADUO_SERVICE_LLM_MAX_RETRY_AFTER_S": "0.5",
            "LLAMADUO_LOG_LEVEL": "INFO",
            "OMP_NUM_THREADS": "1",
        }
        self.stack = Stack(
            StackConfig(
                state_dir=state_dir,
                nats_url=self.settings.nats_url,
                store_url=self.settings.store_url,
                service_llm_base_url=llm.base_url,
                service_llm_model=llm.model,
                replicas=dict.fromkeys(WORKERS, 2),
                extra_env=env,
            )
        )
        self.kills: Counter[str] = Counter()
        self._killed: set[tuple[str, str, int]] = set()
        self._last: tuple[str, str, int] = ("", "", 0)

    def start(self) -> ChaosStack:
        self.nats.start()
        # Provision the consumers with this short ack_wait before anything else connects: a durable consumer keeps
        # the configuration it was created with.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, provision_bus(self.settings)).result()
        self.stack.start()
        return self

    def stop(self) -> None:
        self.stack.stop(timeout=10)
        self.nats.stop()

    @property
    def logs_dir(self) -> Path:
        return self.stack.logs_dir

    def children(self, service: str) -> list[Child]:
        """The running replicas of `service`."""
        return [c for c in self.stack.children if c.name == service or c.name.startswith(f"{service}-")]

    def started(self, service: str, migration_id: str, iteration: int | None) -> tuple[Child, str] | None:
        """The replica of `service` that logged "task started" for (migration, iteration) and has not finished it,
        with the task's event id."""
        for child in self.children(service):
            records = list(log_records(child.log_path))
            for record in records:
                if (
                    record.get("msg") == "task started"
                    and record.get("migration_id") == migration_id
                    and (iteration is None or record.get("iteration") == iteration)
                    and (child.name, str(record.get("event_id")), int(record.get("delivery") or 0)) not in self._killed
                ):
                    ident = str(record.get("event_id"))
                    done = any(r.get("msg") == "task done" and r.get("event_id") == ident for r in records)
                    if not done and child.process is not None and child.process.poll() is None:
                        self._last = (child.name, ident, int(record.get("delivery") or 0))
                        return child, ident
        return None

    def kill_and_replace(self, child: Child, why: str) -> None:
        """SIGKILL one replica, then start it again (as a supervisor would)."""
        assert child.process is not None
        kill9(child.process)
        self.kills[why] += 1
        if self._last[0] == child.name:
            self._killed.add(self._last)  # that task is dead with its process: never report it as started again
        child.start()

    def finished_by(self, child: Child, event_id: str) -> bool:
        """Whether `child`'s log says it finished the task `event_id` (a kill that came too late)."""
        return any(r.get("msg") == "task done" and r.get("event_id") == event_id for r in log_records(child.log_path))

    def client(self) -> Client:
        return Client(self.settings, self.settings)

    def store(self) -> S3Store:
        client = Minio(self.s3_endpoint, access_key="chaos-access", secret_key=self.secrets.s3_secret, secure=False)
        return S3Store(client, self.bucket, "llamaduo")


def coverage_for(stack: ChaosStack, migration_id: str) -> Path:
    """A coverage file whose prompts carry `[migration_id]`."""
    return write_coverage(stack.state_dir / f"{migration_id}.jsonl", migration_id, 40)


async def terminal_state(stack: ChaosStack, migration_id: str, timeout: float) -> MigrationState:
    """Poll KV (through reconnects) until the migration ends and, when a decision ended it, that decision's event
    was accepted by JetStream (the state turns terminal just before the coordinator publishes it)."""
    deadline = time.monotonic() + timeout
    async with stack.client() as client:
        while True:
            try:
                state = await client.status(migration_id)
            except Exception:  # the bus may be restarting under us
                state = None
            decided = state is not None and state.iterations and state.iterations[-1].decision is not None
            if state is not None and state.terminal and (not decided or state.iterations[-1].decision_published):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"{migration_id} did not finish in {timeout:.0f}s (last state: {state})")
            await asyncio.sleep(0.5)


@dataclass
class Audit:
    """What the stream, the store, the logs and the service LLM say about a set of migrations."""

    events_lost: int = 0
    duplicate_events: int = 0
    computed_twice: int = 0
    paid_twice: int = 0
    foreign_refs: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def work_done_twice(self) -> int:
        return self.duplicate_events + self.computed_twice + self.paid_twice


async def audit(stack: ChaosStack, states: dict[str, MigrationState], expected: dict[str, list[str]]) -> Audit:
    """Audit the migrations in `states`; `expected[mid]` lists the `name@iteration` outputs each must have."""
    result = Audit()
    nc = await nats.connect(**stack.settings.connect_options())  # type: ignore[arg-type]
    try:
        messages = await stream_messages(nc.jetstream(), EVENTS_STREAM, "llamaduo.v1.>")
    finally:
        await nc.close()
    store = stack.store()
    outputs: dict[str, Counter[str]] = {mid: Counter() for mid in states}
    for msg in messages:
        mid = (msg.headers or {}).get("ce-subject")
        name = msg.subject.removeprefix("llamaduo.v1.")
        if mid not in states or name not in EVENTS_BY_NAME:
            continue
        body = json.loads(msg.data)
        if name in OUTPUTS:
            outputs[mid][f"{name}@{body.get('iteration', '-')}"] += 1
        for uri in refs_in(body):
            if f"/migrations/{mid}/" not in uri and not uri.endswith(f"/migrations/{mid}"):
                result.foreign_refs.append(f"{mid}: {name} references {uri}")
        if name in ("model.trained", "responses.ready", "evaluation.completed", "dataset.ready"):
            for ref in _ref_objects(body):
                store.read_bytes(ref)  # exists, and its bytes match the sha256 the event promised
    for mid, wanted in expected.items():
        seen = outputs[mid]
        result.events_lost += sum(1 for item in wanted if seen[item] == 0)
        result.duplicate_events += sum(count - 1 for count in seen.values() if count > 1)
        extra = sorted(set(seen) - set(wanted))
        if extra:
            result.notes.append(f"{mid}: unexpected outputs {extra}")
    result.computed_twice = _computed_twice(stack, set(states))
    answered = Counter(marker_of(body) for body in stack.llm.answered)
    for mid, state in states.items():
        over = answered[mid] - state.spend.calls
        if over:
            result.notes.append(f"{mid}: service LLM answered {answered[mid]} calls, ledger holds {state.spend.calls}")
        result.paid_twice += abs(over)
    result.leaked = _leaks(stack, store)
    return result


def _ref_objects(value: Any) -> list[ArtifactRef]:
    found: list[ArtifactRef] = []
    if isinstance(value, dict):
        if isinstance(value.get("uri"), str) and "sha256" in value and "size" in value:
            found.append(ArtifactRef.model_validate({k: value[k] for k in ("uri", "sha256", "size") if k in value}))
        else:
            for item in value.values():
                found += _ref_objects(item)
    elif isinstance(value, list):
        for item in value:
            found += _ref_objects(item)
    return found


def _computed_twice(stack: ChaosStack, migrations: set[str]) -> int:
    """Tasks computed to the end more than once (re-emitting a stored result is not computing it again)."""
    done: dict[tuple[str, str], set[tuple[str, int]]] = {}
    reemitted: set[tuple[str, str, int]] = set()
    for log in stack.logs_dir.glob("*.log"):
        service = log.stem.split("-")[0]
        if service not in WORKERS:
            continue
        for record in log_records(log):
            if record.get("migration_id") not in migrations:
                continue
            key = (service, str(record.get("event_id")))
            delivery = (log.stem, int(record.get("delivery") or 0))
            if record.get("msg") == "task done":
                done.setdefault(key, set()).add(delivery)
            elif "re-emitting" in str(record.get("msg")):
                reemitted.add((*key, *delivery))  # type: ignore[arg-type]
    twice = 0
    for key, deliveries in done.items():
        computed = [d for d in deliveries if (*key, *d) not in reemitted]
        twice += max(0, len(computed) - 1)
    return twice


def _leaks(stack: ChaosStack, store: S3Store) -> list[str]:
    """Where a secret appears: any service log line, any stored artifact."""
    secrets = stack.secrets.values()
    found: list[str] = []
    for log in sorted(stack.logs_dir.glob("*.log")):
        text = log.read_text(errors="replace")
        found += [f"{what} in {log.name}" for what, value in secrets.items() if value in text]
    for item in store.client.list_objects(stack.bucket, prefix="llamaduo/", recursive=True):
        data = store._get(stack.bucket, item.object_name)
        where = f"s3://{stack.bucket}/{item.object_name}"
        found += [f"{what} in {where}" for what, value in secrets.items() if value.encode() in data]
    return found


def record(scenario: ScenarioTally, result: Audit) -> None:
    """Copy an audit into the scenario's row."""
    scenario.events_lost += result.events_lost
    scenario.work_done_twice += result.work_done_twice


def spec_for(base: MigrationSpec, coverage: Path, threshold: float) -> MigrationSpec:
    """`base` reading `coverage`, graduating when both scores reach `threshold`."""
    evaluation = base.evaluation.model_copy(update={"thresholds": {"similarity": threshold, "precision": threshold}})
    return base.model_copy(
        update={"coverage": base.coverage.model_copy(update={"uri": str(coverage)}), "evaluation": evaluation}
    )
