"""The imgsearch CLI on a role install: a subcommand whose extra is missing is listed, marked,
and run it names the extra to install (exit 2); a missing module that no extra explains is
shown as it is. The gateway image's case, with real metadata hidden, is in test_deploy.py."""

from __future__ import annotations

import importlib.metadata as md
import sys
import tomllib
import types
from pathlib import Path

import pytest

from imgsearch import cli


@pytest.fixture
def fake_command(monkeypatch):
    """One subcommand, ``fake``, of the [export] extra, whose run records that it ran."""
    ran = []
    mod = types.ModuleType("fake_part_cli")
    mod.add_arguments = lambda p: p.add_argument("--size", type=int, required=True)
    mod.run = lambda args: ran.append(args.size) or 0
    monkeypatch.setitem(sys.modules, "fake_part_cli", mod)
    monkeypatch.setattr(cli, "COMMANDS", [("fake", "fake_part_cli", "export", "a fake part")])
    return ran


def missing(monkeypatch, *names: str) -> None:
    monkeypatch.setattr(cli, "missing_from_extra", lambda extra: names if extra == "export" else ())


def test_command_runs_when_its_extra_is_installed(fake_command, monkeypatch):
    missing(monkeypatch)
    assert cli.main(["fake", "--size", "3"]) == 0
    assert fake_command == [3]


def test_command_without_its_extra_is_listed_and_names_the_extra(fake_command, monkeypatch, capsys):
    missing(monkeypatch, "torch", "onnx")
    assert "[needs the export extra]" in cli.build_parser().format_help()
    # its own arguments (and their absence) do not matter: the extra is what is missing
    assert cli.main(["fake", "--whatever", "x"]) == 2
    err = capsys.readouterr().err
    assert "imgsearch fake needs the [export] extra: pip install 'imgsearch[export]' (missing: torch, onnx)" in err
    assert fake_command == []


def test_unknown_arguments_of_an_installed_command_are_still_an_error(fake_command, monkeypatch, capsys):
    missing(monkeypatch)
    with pytest.raises(SystemExit) as e:
        cli.main(["fake", "--size", "3", "--whatever"])
    assert e.value.code == 2 and "unrecognized arguments: --whatever" in capsys.readouterr().err
    assert fake_command == []


def test_module_failing_to_import_without_its_extra_becomes_the_hint(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", [("fake", "no_such_module_for_imgsearch", "export", "a fake part")])
    missing(monkeypatch, "torch")
    assert cli.main(["fake"]) == 2
    assert "needs the [export] extra" in capsys.readouterr().err


def test_module_failing_to_import_with_its_extra_installed_is_a_bug_shown_as_is(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", [("fake", "no_such_module_for_imgsearch", "export", "a fake part")])
    missing(monkeypatch)
    with pytest.raises(ModuleNotFoundError, match="no_such_module_for_imgsearch"):
        cli.build_parser()


def test_missing_from_extra_reads_the_installed_metadata(monkeypatch):
    requires = md.requires("imgsearch") or []
    assert any('extra == "export"' in r and r.startswith("torch") for r in requires), "reinstall: pip install -e ."
    cli.missing_from_extra.cache_clear()
    real = md.distribution

    def distribution(name):
        if name in ("torch", "locust"):
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "distribution", distribution)
    try:
        assert cli.missing_from_extra("export") == ("torch",)
        assert cli.missing_from_extra("loadtest") == ("locust",)
        assert cli.missing_from_extra("gateway") == ()
    finally:
        cli.missing_from_extra.cache_clear()


def test_every_command_names_a_known_extra():
    extras = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for name, _module, extra, _help in cli.COMMANDS:
        assert extra is None or extra in extras, f"{name}: [{extra}] is not an extra of pyproject.toml"
