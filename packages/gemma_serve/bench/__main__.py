"""`python -m gemma_serve.bench ...`: the same command as `python -m gemma_serve bench ...`."""

import argparse
import sys

from gemma_serve.bench import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma_serve.bench",
                                     description="Benchmark an OpenAI-compatible or Truss endpoint.")
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
