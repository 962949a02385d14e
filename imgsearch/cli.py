"""``imgsearch``: one command, a subcommand per part.

Each part owns its subcommand in its own ``cli.py`` (``add_arguments`` + ``run``); this
module only wires them, importing nothing heavy until a subcommand runs. Every subcommand
is listed whatever was installed: one whose extra (pyproject.toml) is missing says which
to install and exits 2, instead of failing on a missing import halfway.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import logging
import re
import sys
from functools import cache

from .errors import ImgsearchError

# name, module, the extra it needs beyond the core (None: the core suffices), help
COMMANDS: list[tuple[str, str, str | None, str]] = [
    ("export", "imgsearch.export.cli", "export", "export a ResNet to ONNX + Triton configs into the model repository"),
    ("triton", "imgsearch.triton_cli", "local", "run the local tritonserver (from the nvidia-pytriton wheel)"),
    ("index", "imgsearch.indexer.cli", "gateway", "encode an image folder through Triton into Milvus"),
    ("collection", "imgsearch.indexer.collection_cli", None, "inspect or drop the Milvus collection"),
    ("serve", "imgsearch.gateway.cli", "gateway",
     "run the search gateway (and the local Triton unless IMGSEARCH_TRITON_URL is set)"),
    ("demo-data", "imgsearch.indexer.demo_data", "demo", "build a demo image set from scikit-image's sample photos"),
    ("fetch", "imgsearch.indexer.fetch", "gateway", "download and verify Stanford Dogs (needs internet)"),
    ("loadtest", "imgsearch.loadtest.cli", "loadtest", "run Locust against the gateway and write an HTML report with plots"),
    ("finetune", "imgsearch.export.finetune_cli", "export", "fine-tune layer4 + head on an ImageFolder dataset"),
    ("eval", "imgsearch.export.eval_cli", "export", "measure retrieval quality through the served model"),
]

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA = re.compile(r"""\bextra\s*==\s*["']([^"']+)["']""")


@cache
def missing_from_extra(extra: str) -> tuple[str, ...]:
    """The distributions that imgsearch's ``extra`` requires and are not installed.

    Empty when imgsearch has no installed metadata (a bare source tree): nothing to judge by.
    """
    try:
        requires = md.requires("imgsearch") or []
    except md.PackageNotFoundError:
        return ()
    missing = []
    for line in requires:
        marker = _EXTRA.search(line)
        if not marker or marker.group(1) != extra:
            continue
        name = _NAME.match(line).group(1)
        try:
            md.distribution(name)
        except md.PackageNotFoundError:
            missing.append(name)
    return tuple(missing)


def needs_extra(command: str, extra: str) -> str:
    return f"imgsearch {command} needs the [{extra}] extra: pip install 'imgsearch[{extra}]'"


EPILOG = """\
typical session:
  imgsearch export --weights random          # model_repository/resnet152/ (ONNX + configs)
  imgsearch index data/images                # starts the local Triton, fills ./data/milvus.db
  imgsearch serve                            # http://127.0.0.1:8000 (page) and /docs (API)
  imgsearch loadtest --run-time 30s          # Locust + report.html

settings come from IMGSEARCH_* environment variables (or .env); see README.md.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgsearch", description="Reverse image search: ResNet -> ONNX -> Triton -> Milvus, behind FastAPI.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, extra, help_ in COMMANDS:
        missing = missing_from_extra(extra) if extra else ()
        if missing:
            # listed all the same; takes any arguments, and main says what to install
            p = sub.add_parser(name, help=f"{help_} [needs the {extra} extra]",
                               description=f"{help_}\n\n{needs_extra(name, extra)}",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            p.set_defaults(_run=None, _extra=extra, _missing=missing)
            continue
        mod = importlib.import_module(module)  # with its extra installed, a failed import is a bug to show
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and getattr(args, "_run", True) is not None:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if args._run is None:
        print(f"{needs_extra(args.command, args._extra)} (missing: {', '.join(args._missing)})", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except ImgsearchError as e:
        print(f"imgsearch {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
