"""The data-parallel launch lines are what `accelerate launch` and torchrun accept (their own parsers read them)."""

from __future__ import annotations

from pathlib import Path

from accelerate.commands.launch import launch_command_parser
from torch.distributed.run import get_args_parser

from llamaduo_trainer.launch import command


def test_the_accelerate_line_runs_our_module_on_n_gpus_data_parallel() -> None:
    argv = command("accelerate", 4, Path("/work/job.json"))
    assert argv[1:3] == ["-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(argv[3:])
    assert args.multi_gpu and args.num_processes == 4 and args.module
    assert (args.training_script, args.training_script_args) == ("llamaduo_trainer.launch", ["/work/job.json"])


def test_the_torchrun_line_runs_our_module_on_n_local_processes() -> None:
    argv = command("torchrun", 2, Path("/work/job.json"))
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    args = get_args_parser().parse_args(argv[3:])
    assert args.nproc_per_node == "2" and args.standalone and args.module
    assert (args.training_script, args.training_script_args) == ("llamaduo_trainer.launch", ["/work/job.json"])
