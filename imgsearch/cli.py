"""``imgsearch``: one command, a subcommand per part.

Each part owns its subcommand in its own ``cli.py`` (``add_arguments`` + ``run``); this
module only wires them, importing nothing heavy until a subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import ImgsearchError

COMMANDS: list[tuple[str, str, str]] = [
    ("export", "imgsearch.export.cli", "export a ResNet to ONNX + Triton configs into the model repository"),
    ("triton", "imgsearch.triton_cli", "run the local tritonserver (from the nvidia-pytriton wheel)"),
    ("index", "imgsearch.indexer.cli", "encode an image folder through Triton into Milvus"),
    ("collection", "imgsearch.indexer.collection_cli", "inspect or drop the Milvus collection"),
    ("serve", "imgsearch.gateway.cli", "run the search gateway (and the local Triton unless IMGSEARCH_TRITON_URL is set)"),
    ("demo-data", "imgsearch.indexer.demo_data", "build a demo image set from scikit-image's sample photos"),
    ("fetch", "imgsearch.indexer.fetch", "download and verify Stanford Dogs (needs internet)"),
    ("loadtest", "imgsearch.loadtest.cli", "run Locust against the gateway and write an HTML report with plots"),
    ("finetune", "imgsearch.export.finetune_cli", "fine-tune layer4 + head on an ImageFolder dataset"),
    ("eval", "imgsearch.export.eval_cli", "measure retrieval quality through the served model"),
]

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
    for name, module, help_ in COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                continue  # a part not built yet
            raise
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "_run", None):
        parser.print_help()
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
