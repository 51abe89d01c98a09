"""`python -m runtime_ops.build [-v]`: build the kernel library (see `runtime_ops.library.build`).

Prints the installed library's path; on failure one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import sys

from runtime_ops.library import build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime_ops.build", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show cmake's and the compiler's output")
    args = parser.parse_args(argv)
    try:
        path = build(verbose=args.verbose)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
