"""Every committed results record names a command that runs it again with today's code.

A record is any JSON object in ``bench/results/`` with a ``command``: the file's top level, a
run summarised inside a larger file, a cell of a table. Its command is ``python -m
bench.<module> ...``, parsed by that module's ``parser()``, or ``imgsearch <subcommand> ...``,
parsed by that subcommand's arguments. A record whose run the current benchmark cannot repeat
as it was keeps its ``command`` as history and names the closest one in ``command_now``, with
``command_now_differs`` saying what differs; then ``command_now`` is the one checked.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgsearch.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path("bench/results")
FILES = sorted(p.relative_to(ROOT) for p in (ROOT / RESULTS).rglob("*.json"))


def records(node: object, where: str = "") -> Iterator[tuple[str, dict]]:
    """(JSON path, object) for every object holding a ``command`` string, at any depth."""
    if isinstance(node, dict):
        if isinstance(node.get("command"), str):
            yield where or "/", node
        for k, v in node.items():
            yield from records(v, f"{where}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from records(v, f"{where}[{i}]")


def current_command(record: dict) -> str:
    if "command_now" in record:
        assert record.get("command_now_differs"), "command_now comes with command_now_differs"
        return record["command_now"]
    return record["command"]


def imgsearch_parser(sub: str) -> argparse.ArgumentParser:
    modules = {name: module for name, module, _extra, _help in COMMANDS}
    assert sub in modules, f"imgsearch has no {sub!r} command"
    p = argparse.ArgumentParser(prog=f"imgsearch {sub}")
    importlib.import_module(modules[sub]).add_arguments(p)
    return p


def parse(line: list[str]) -> tuple[str, argparse.Namespace]:
    """The module or subcommand a command line runs, and its arguments as its parser reads them;
    argparse exits (SystemExit) on an argument the parser does not know."""
    if line[:2] == ["python", "-m"] and line[2].startswith("bench."):
        mod = importlib.import_module(line[2])  # ModuleNotFoundError: no such benchmark
        assert callable(getattr(mod, "main", None)), f"{line[2]} has no main()"
        return line[2], mod.parser().parse_args(line[3:])
    assert line[0] == "imgsearch", f"neither python -m bench.<module> nor imgsearch: {shlex.join(line)}"
    return f"imgsearch {line[1]}", imgsearch_parser(line[1]).parse_args(line[2:])


def test_the_records_are_found_at_any_depth():
    doc = {"command": "a", "runs": [{"command": "b", "x": {"command": "c"}}, {"command": 1}], "n": {"m": []}}
    assert [(w, r["command"]) for w, r in records(doc)] == [("/", "a"), ("/runs[0]", "b"), ("/runs[0]/x", "c")]


def test_a_record_that_cannot_be_repeated_as_it_ran_says_what_differs():
    assert current_command({"command": "old", "command_now": "new", "command_now_differs": "why"}) == "new"
    with pytest.raises(AssertionError):
        current_command({"command": "old", "command_now": "new"})


def test_an_unknown_option_or_module_fails_the_check():
    with pytest.raises(SystemExit):
        parse(shlex.split("python -m bench.search --no-such-option 1"))
    with pytest.raises(ModuleNotFoundError):
        parse(shlex.split("python -m bench.no_such_benchmark"))
    with pytest.raises(AssertionError):
        parse(shlex.split("python loadtest/bench_index.py data/images"))


def file_records(path: Path) -> list[tuple[str, dict]]:
    return list(records(json.loads((ROOT / path).read_text())))


@pytest.mark.parametrize("path", [p for p in FILES if file_records(p)], ids=str)
def test_committed_records_name_a_command_that_parses(path: Path):
    for where, record in file_records(path):
        line = shlex.split(current_command(record))
        try:
            name, args = parse(line)
        except SystemExit:
            pytest.fail(f"{path} {where}: {shlex.join(line)} does not parse")
        out = getattr(args, "out", None)
        if name.startswith("bench.") and out is not None:
            # the file the run wrote is this one or the record's own ("file"), relative to bench/results;
            # a summarised run whose output is not committed keeps a scratch --out
            expected = RESULTS / record["file"] if "file" in record else path
            if where == "/" or "file" in record or Path(out).is_relative_to(RESULTS):
                assert Path(out) == expected, f"{path} {where}: {name} writes {out}, not {expected}"
            assert (ROOT / expected).is_file(), f"{path} {where}: {expected} is not committed"


def test_every_results_file_says_how_to_run_it_again():
    tops = [p for p in FILES if p.parent == RESULTS]
    assert tops
    for path in tops:
        assert file_records(path), f"{path} names no command"
