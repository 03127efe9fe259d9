"""`spin-kernels` command line (subcommands are added by the training layer)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .examples.ops_demo import main as ops_demo

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["demo"]:
        return ops_demo(args[1:])
    print("usage: spin-kernels demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
