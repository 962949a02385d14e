"""Dependencies by role, locked.

- uv.lock was resolved from pyproject.toml as it stands (an edit without ``make lock`` fails here);
- requirements/*.txt, what pip installs (``make setup`` without uv, the gateway image), are
  uv.lock's closure of their extra: the same versions and hashes;
- each component's imports are covered by its role's extra, and the roles stay apart: the
  gateway's closure has no torch, onnx, Locust or matplotlib.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name as canon

from harness.deps import read_export

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = tomllib.loads((ROOT / "uv.lock").read_text())
PACKAGES = {p["name"]: p for p in LOCK["package"]}
EXPORTS = {"gateway": ROOT / "requirements" / "gateway.txt", "dev": ROOT / "requirements" / "dev.txt"}


def lock_closure(extras: set[str]) -> dict[str, dict]:
    """uv.lock's packages that imgsearch with ``extras`` installs on this platform (imgsearch itself left out)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [("imgsearch", frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        pkg = PACKAGES[name]
        deps = list(pkg.get("dependencies", []))
        for extra in wanted:
            deps += pkg.get("optional-dependencies", {}).get(extra, [])
        for dep in deps:
            if "marker" not in dep or Marker(dep["marker"]).evaluate():
                todo.append((dep["name"], frozenset(dep.get("extra", []))))
    return {name: PACKAGES[name] for name, _ in seen if name != "imgsearch"}


def exported(path: Path) -> dict[str, tuple[str, set[str]]]:
    """name -> (version, hashes) of the requirements in a file ``uv export`` wrote that apply here."""
    out: dict[str, tuple[str, set[str]]] = {}
    for name, (req, hashes) in read_export(path).items():
        (spec,) = req.specifier
        assert spec.operator == "==", req
        out[name] = (spec.version, hashes)
    return out


def _lock_hashes(pkg: dict) -> set[str]:
    return {w["hash"] for w in pkg.get("wheels", [])} | ({pkg["sdist"]["hash"]} if "sdist" in pkg else set())


def _requirement_key(name: str, extras, specifier: str, marker: str | None) -> tuple:
    return canon(name), frozenset(extras or ()), SpecifierSet(specifier or ""), marker


def test_lock_is_resolved_from_pyproject():
    """uv.lock records the requirements it resolved; they are pyproject.toml's (else: make lock)."""
    project = PYPROJECT["project"]
    want = set()
    for line in project["dependencies"]:
        r = Requirement(line)
        want.add(_requirement_key(r.name, r.extras, str(r.specifier), None))
    for extra, lines in project["optional-dependencies"].items():
        for line in lines:
            r = Requirement(line)
            want.add(_requirement_key(r.name, r.extras, str(r.specifier), f"extra == '{extra}'"))
    meta = PACKAGES["imgsearch"]["metadata"]
    have = {_requirement_key(d["name"], d.get("extras"), d.get("specifier"), d.get("marker"))
            for d in meta["requires-dist"]}
    assert have == want, f"uv.lock is stale, run make lock: only in pyproject {want - have}, only in uv.lock {have - want}"
    assert set(meta["provides-extras"]) == set(project["optional-dependencies"])


@pytest.mark.parametrize("extra", sorted(EXPORTS))
def test_requirements_files_are_the_lock(extra):
    """What pip installs from requirements/<extra>.txt is what uv installs from uv.lock."""
    locked = {canon(name): (pkg["version"], _lock_hashes(pkg)) for name, pkg in lock_closure({extra}).items()}
    files = exported(EXPORTS[extra])
    assert set(files) == set(locked), f"run make lock: {set(files) ^ set(locked)}"
    for name, (version, hashes) in locked.items():
        assert files[name][0] == version, f"{name}: {files[name][0]} in {EXPORTS[extra].name}, {version} in uv.lock"
        assert files[name][1] == hashes, name


def test_closure_walk_follows_extras_and_markers():
    """The walk the other tests trust: extras of dependencies count, other platforms' do not."""
    gateway = lock_closure({"gateway"})
    assert {"uvloop", "httptools", "watchfiles"} <= set(gateway)  # uvicorn[standard]
    assert {"pyzmq", "greenlet"} <= set(lock_closure({"loadtest"}))
    assert "cffi" in PACKAGES and "cffi" not in lock_closure({"dev"})  # pyzmq's on PyPy only
    assert lock_closure(set()).keys() < gateway.keys()


FORBIDDEN = {"torch", "torchvision", "timm", "onnx", "onnxscript", "onnxruntime", "nvidia-pytriton", "locust",
             "matplotlib", "scikit-image", "milvus-lite"}


def test_roles_stay_apart():
    core, gateway = lock_closure(set()), lock_closure({"gateway"})
    assert not set(gateway) & FORBIDDEN, set(gateway) & FORBIDDEN
    assert not any(n.startswith(("nvidia-", "cuda-")) for n in gateway)
    assert not {"fastapi", "uvicorn", "tqdm"} & set(core)
    assert {"torch", "torchvision", "onnx", "onnxruntime"} <= set(lock_closure({"export"}))
    assert not {"locust", "fastapi"} & set(lock_closure({"export"}))
    assert {"locust", "matplotlib", "jinja2"} <= set(lock_closure({"loadtest"}))
    assert "torch" not in lock_closure({"loadtest"})
    assert {"nvidia-pytriton", "milvus-lite"} <= set(lock_closure({"local"}))
    dev = lock_closure({"dev"})
    for extra in set(PYPROJECT["project"]["optional-dependencies"]) - {"gpu", "dev"}:
        assert set(lock_closure({extra})) <= set(dev), extra
    assert PACKAGES["torch"]["version"] == "2.14.1" and PACKAGES["torchvision"]["version"] == "0.29.1"


# Each component folder -> the extras its role installs. Modules that need more say so below.
ROLES = {"imgsearch": set(), "gateway": {"gateway"}, "indexer": {"gateway"}, "export": {"export"},
         "loadtest": {"loadtest"}}
# module (path from the repository root) -> (the extras it needs, why)
EXCEPTIONS = {
    "indexer/demo_data.py": ({"gateway", "demo"}, "imgsearch demo-data"),
    # the copy-detection benchmark's module: bench/ runs with the [dev] extra
    "export/copydetect.py": ({"dev"}, "python -m bench.quality"),
}
# imported by modules that do not run in the role's Python: Triton's Python backend provides it
NOT_DISTRIBUTIONS = {"triton_python_backend_utils"}


def absolute_imports(path: Path) -> list[str]:
    """Every module ``path`` imports by absolute name, at any depth (functions included)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def third_party_imports(path: Path) -> set[str]:
    local = {p.stem for p in path.parent.glob("*.py")}
    tops = {name.split(".")[0] for name in absolute_imports(path)}
    return {t for t in tops if t not in sys.stdlib_module_names and t not in local and t != "imgsearch"}


def test_every_component_import_is_in_its_role():
    """Every third-party module a component imports comes from a distribution of its role's
    closure (mapped through the installed distributions)."""
    provides = md.packages_distributions()
    checked = 0
    for folder, extras in ROLES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            needs = EXCEPTIONS.get(rel, (extras, ""))[0]
            if rel.startswith("export/templates/"):
                continue  # run inside Triton's Python backend (tests/integration/test_ensemble.py)
            closure = {canon(n) for n in lock_closure(needs)}
            for module in third_party_imports(path) - NOT_DISTRIBUTIONS:
                dists = {canon(d) for d in provides.get(module, [])}
                assert dists, f"{rel}: {module} is not installed"
                assert dists & closure, f"{rel} imports {module} ({', '.join(dists)}), not in imgsearch[{','.join(needs)}]"
                checked += 1
    assert checked > 20


def test_role_check_would_catch_a_stray_import(tmp_path):
    """The scan sees a module-level and a function-level import alike."""
    mod = tmp_path / "m.py"
    mod.write_text("import os\nimport numpy as np\ndef f():\n    import torch\n    from matplotlib import pyplot\n")
    assert third_party_imports(mod) == {"numpy", "torch", "matplotlib"}
    gateway = {canon(n) for n in lock_closure({"gateway"})}
    assert not {canon(d) for d in md.packages_distributions()["torch"]} & gateway


COMPONENTS = {"gateway", "export", "indexer", "loadtest"}  # installed as imgsearch.<name>


def top_level_component_imports(path: Path) -> list[str]:
    """``import gateway`` / ``from export.x import y`` in ``path``: names that resolve to a
    component folder only where the repository root is on sys.path, as a second copy."""
    return [n for n in absolute_imports(path) if n.split(".")[0] in COMPONENTS]


def test_components_are_imported_through_the_imgsearch_namespace(tmp_path):
    files = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "site-packages" not in p.parts]
    assert len(files) > 100
    found = {p.relative_to(ROOT).as_posix(): top_level_component_imports(p) for p in files}
    assert {k: v for k, v in found.items() if v} == {}
    stray = tmp_path / "m.py"
    stray.write_text("import gateway.app\nfrom imgsearch.gateway import app\ndef f():\n    from export import cli\n")
    assert top_level_component_imports(stray) == ["gateway.app", "export"]
