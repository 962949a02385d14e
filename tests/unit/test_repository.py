"""The repository explains itself: its docs name every setting and point only at files it holds."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from imgsearch.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.stdout.split()]


def test_design_doc_lists_every_setting():
    design = (ROOT / "docs" / "design.md").read_text()
    documented = set(re.findall(r"`IMGSEARCH_([A-Z0-9_]+)`", design))
    names = {n.upper() for n in Settings.model_fields}
    assert names - documented == set(), "settings missing from docs/design.md"
    assert documented - names == set(), "docs/design.md documents settings that do not exist"


def test_markdown_links_point_at_files_in_the_repository():
    broken = []
    for md in tracked("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path = (md.parent / target).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_backticked_repository_paths_exist():
    """A path written like `bench/results/x.json` or `gateway/app.py` in a doc names a real file
    (outputs the commands write, under `out/` or `data/`, excepted)."""
    tops = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
    missing = []
    for md in tracked("*.md"):
        for path in re.findall(r"`([a-z_]+/[\w./-]+\.(?:py|md|json|yaml|sh|pbtxt|toml|txt))`", md.read_text()):
            generated = "/out/" in path or path.startswith("data/")
            if path.split("/")[0] in tops and not generated and "<" not in path and "*" not in path \
                    and not (ROOT / path).exists():
                missing.append(f"{md.relative_to(ROOT)}: {path}")
    assert not missing, missing
