"""Generated files, written and checked one way: a generator renders `{path relative to the checkout: text}`,
`make generate` writes that mapping and `make verify` (`--check`) lists the files on disk that differ from it.

It lives in `api` (the lowest layer) so that both generators, `api.crdgen` and `rbac.render`, may use it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# operator/celery_fleet/api/generated.py -> the checkout root (the package is installed editable).
REPO_ROOT = Path(__file__).resolve().parents[3]

# Path relative to the checkout root -> the file's full text.
GeneratedFiles = Mapping[Path, str]


def write_files(root: Path, files: GeneratedFiles) -> list[Path]:
    """Write every file under `root`, making directories as needed; returns the paths written."""
    written = []
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale_files(root: Path, files: GeneratedFiles) -> list[Path]:
    """The files under `root` that are missing or whose bytes differ from the generated text."""
    stale = []
    for relative, text in files.items():
        path = root / relative
        if not path.is_file() or path.read_bytes() != text.encode("utf-8"):
            stale.append(path)
    return stale


def generator_main(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    files: Callable[[], GeneratedFiles],
    stale_message: str,
) -> int:
    """Write the generated files under --root, or with --check list the stale ones and fail."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--check", action="store_true", help="fail if the files on disk are stale")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="checkout root (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.root, files())
        for path in stale:
            print(f"stale: {path}", file=sys.stderr)
        if stale:
            print(stale_message, file=sys.stderr)
            return 1
        return 0
    for path in write_files(args.root, files()):
        print(f"wrote {path}")
    return 0
