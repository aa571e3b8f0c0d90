"""Data-parallel training across processes (GPUs): the trainer runs this module under `accelerate launch`.

The task writes a job file (rows, settings, where to write) and starts `accelerate launch --multi_gpu
--num_processes N -m llamaduo_trainer.launch JOB` (or `torchrun --nproc_per_node N`, which also runs on CPUs with
gloo). Every process runs the same `train_adapter`; the Trainer splits each batch across them (DDP). Process 0 alone
reports progress (JSON lines on stdout, read by the task), uploads checkpoints and writes the adapter and the result.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from llamaduo.contract.spec import LoraSpec, TrainingSpec
from llamaduo.data import ChatRow, parse_jsonl
from llamaduo.store import open_store
from llamaduo_trainer.checkpoints import CheckpointStore
from llamaduo_trainer.finetune import TrainingError, TrainResult, train_adapter
from llamaduo_trainer.settings import TrainerSettings

Launcher = Literal["accelerate", "torchrun"]
PROGRESS_PREFIX = "LLAMADUO-PROGRESS "
ERROR_FILE = "error.json"
RESULT_FILE = "result.json"


class Job(BaseModel):
    """Everything one data-parallel run needs, written by the task and read by every process."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    rows: str
    out_dir: str
    lora: LoraSpec
    training: TrainingSpec
    device: str
    checkpoint_dir: str
    resume_from: str | None = None
    init_adapter: str | None = None
    migration_id: str
    iteration: int
    run: str
    store_url: str


def command(launcher: Launcher, processes: int, job_file: Path) -> list[str]:
    """The launch command line for `processes` processes."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--standalone",
                "-m", "llamaduo_trainer.launch", str(job_file)]  # fmt: skip
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={processes}",
            "-m", "llamaduo_trainer.launch", str(job_file)]  # fmt: skip


def run_data_parallel(
    job: Job,
    work: Path,
    *,
    processes: int,
    launcher: Launcher,
    on_step: Callable[[int, int, float | None], None] | None,
) -> TrainResult:
    """Run `job` on `processes` processes and return process 0's result; progress lines are forwarded to on_step."""
    work.mkdir(parents=True, exist_ok=True)
    job_file = work / "job.json"
    job_file.write_text(job.model_dump_json())
    for name in (RESULT_FILE, ERROR_FILE):
        (work / name).unlink(missing_ok=True)
    env = {**os.environ, "LLAMADUO_LAUNCH_DIR": str(work)}
    process = subprocess.Popen(
        command(launcher, processes, job_file), env=env, stdout=subprocess.PIPE, stderr=None, text=True
    )
    assert process.stdout is not None
    tail: list[str] = []
    for line in process.stdout:
        if line.startswith(PROGRESS_PREFIX):
            if on_step is not None:
                step, total, loss = json.loads(line.removeprefix(PROGRESS_PREFIX))
                on_step(int(step), int(total), loss)
        else:
            tail = [*tail[-20:], line.rstrip()]
    code = process.wait()
    if (work / ERROR_FILE).is_file():
        error = json.loads((work / ERROR_FILE).read_text())
        raise TrainingError(error["reason"], error["message"])
    if code != 0 or not (work / RESULT_FILE).is_file():
        raise RuntimeError(f"data-parallel training exited with {code}: " + " | ".join(tail[-5:]))
    return TrainResult(**json.loads((work / RESULT_FILE).read_text()))


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def main(argv: Sequence[str] | None = None) -> None:
    """One process of a data-parallel run (started by `accelerate launch` or torchrun)."""
    args = list(sys.argv[1:] if argv is None else argv)
    job = Job.model_validate_json(Path(args[0]).read_text())
    work = Path(os.environ.get("LLAMADUO_LAUNCH_DIR", Path(args[0]).parent))
    rank = _rank()
    rows: list[ChatRow] = parse_jsonl(Path(job.rows).read_bytes(), job.rows)
    lead = rank == 0
    out_dir = Path(job.out_dir) if lead else work / f"rank-{rank}"
    checkpoints = None
    if lead:
        # The store's credentials come from the environment, which the launched processes inherit.
        settings = TrainerSettings(store_url=job.store_url)
        checkpoints = CheckpointStore(open_store(settings), job.migration_id, job.iteration, job.run, work / "upload")

    def progress(step: int, total: int, loss: float | None) -> None:
        print(PROGRESS_PREFIX + json.dumps([step, total, loss]), flush=True)

    try:
        result = train_adapter(
            job.base_model,
            rows,
            out_dir,
            lora=job.lora,
            training=job.training,
            device=job.device,
            on_step=progress if lead else None,
            checkpoint_dir=Path(job.checkpoint_dir) if lead else work / f"checkpoints-{rank}",
            on_checkpoint=checkpoints.save if checkpoints is not None else None,
            resume_from=Path(job.resume_from) if job.resume_from else None,
            init_adapter=Path(job.init_adapter) if job.init_adapter else None,
        )
    except TrainingError as exc:
        if lead:
            (work / ERROR_FILE).write_text(json.dumps({"reason": exc.reason, "message": str(exc)}))
        raise SystemExit(3) from None
    if lead:
        (work / RESULT_FILE).write_text(json.dumps(dataclasses.asdict(result), default=_plain))
    else:
        shutil.rmtree(out_dir, ignore_errors=True)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return str(value)


if __name__ == "__main__":
    main()
