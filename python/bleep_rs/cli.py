"""The ``bleep-rs`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from bleep_rs import BleepError, __version__


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bleep-rs", description=__doc__)
    parser.add_argument("--version", action="version", version=f"bleep-rs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the pipeline end to end on a generated example")
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for the outputs (default: demo-out)")
    demo.add_argument("--k", type=int, default=50, help="neighbours per prediction (default: 50)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from bleep_rs import demo as demo_module

            demo_module.run(args.out, k=args.k, seed=args.seed)
    except BleepError as e:
        print(f"bleep-rs: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
