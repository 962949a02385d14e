"""bench.quality records the command that runs it again."""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path

from bench import command_line, quality


def test_the_recorded_command_runs_this_benchmark_with_the_same_arguments():
    argv = ["--out", "bench/results/a b.json", "--skip", "finetune", "random", "--originals", "6"]
    line = shlex.split(command_line(quality.MODULE, argv))
    assert line[:2] == ["python", "-m"]
    assert importlib.import_module(line[2]).main is quality.main
    assert line[3:] == argv
    args = quality.parser().parse_args(line[3:])
    assert args.out == Path("bench/results/a b.json") and args.skip == ["finetune", "random"] and args.originals == 6

