"""The command line of every generator (`make generate` writes, `make verify` runs `--check`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# operator/celery_fleet/api/generated.py -> the checkout root (the package is installed editable).
REPO_ROOT = Path(__file__).resolve().parents[3]


def generator_main(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    write: Callable[[Path], list[Path]],
    stale_files: Callable[[Path], list[Path]],
    stale_message: str,
) -> int:
    """Write the generated files under --root, or with --check list the stale ones and fail."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--check", action="store_true", help="fail if the files on disk are stale")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="checkout root (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.root)
        for path in stale:
            print(f"stale: {path}", file=sys.stderr)
        if stale:
            print(stale_message, file=sys.stderr)
            return 1
        return 0
    for path in write(args.root):
        print(f"wrote {path}")
    return 0
