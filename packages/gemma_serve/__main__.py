"""`python -m gemma_serve <command>`: serve | make-tiny-model | bench."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from gemma_serve.dev_server import REPO_ROOT

TINY_MODEL_DIR = REPO_ROOT / ".cache" / "tiny-gemma"


def _serve(args: argparse.Namespace) -> int:
    from gemma_serve import dev_server

    env = {}
    model = args.model or os.environ.get("GEMMA_SERVE_MODEL")
    if not model:
        from gemma_serve.tiny_model import make_tiny_gemma

        model = str(make_tiny_gemma(TINY_MODEL_DIR))
        env.setdefault("GEMMA_SERVE_SERVED_MODEL_NAME", "tiny-gemma")
        logging.info("no model configured: serving the tiny random Gemma at %s (its text is gibberish)", model)
    env["GEMMA_SERVE_MODEL"] = model
    if args.device:
        env["GEMMA_SERVE_DEVICE"] = args.device
    if args.direct:
        from gemma_serve.direct import serve_direct

        return serve_direct(args.port, env)
    return dev_server.serve(args.port, env)


def _tiny(args: argparse.Namespace) -> int:
    from gemma_serve.tiny_model import make_tiny_gemma

    print(make_tiny_gemma(Path(args.out), force=args.force))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m gemma_serve")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the Truss locally: truss server -> tritonserver -> engine")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--model", help="Hugging Face repo id or local folder (default: the tiny Gemma)")
    serve.add_argument("--device", help="auto | cpu | cuda")
    serve.add_argument("--direct", action="store_true",
                       help="the engine in this process behind the same API code, without the Truss server "
                            "and Triton (the benchmark's baseline; see gemma_serve/direct.py)")
    serve.set_defaults(func=_serve)

    tiny = sub.add_parser("make-tiny-model", help="write the deterministic tiny Gemma 3 checkpoint")
    tiny.add_argument("out", nargs="?", default=str(TINY_MODEL_DIR))
    tiny.add_argument("--force", action="store_true")
    tiny.set_defaults(func=_tiny)

    try:
        from gemma_serve.bench import cli as bench_cli
    except ImportError:
        bench_cli = None
    if bench_cli is not None:
        bench = sub.add_parser("bench", help="benchmark an OpenAI-compatible or Truss endpoint")
        bench_cli.add_arguments(bench)
        bench.set_defaults(func=bench_cli.run)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
