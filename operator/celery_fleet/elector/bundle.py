"""Build the single-file elector beat pods run: a zipapp of this package, standard library only.

    python -m celery_fleet.elector.bundle OUT.pyz

The image build runs this (Dockerfile); the local runtime builds its own copy the same way, so
the file is a build product, never committed. The archive is reproducible: members in a fixed
order with fixed timestamps, so the same sources give the same bytes (and the same digest).
"""

from __future__ import annotations

import io
import os
import sys
import zipfile
from pathlib import Path

# The modules a pod needs, in the package; `bundle` itself stays out.
BUNDLED_MODULES = (
    "__init__", "election", "schedule_state", "process", "loop", "lease_client", "schedule_store", "cli", "__main__",
)  # fmt: skip
# Beat's scheduler (celery_fleet.beat), which the elector puts on beat's path with --schedule-state.
BUNDLED_BEAT_MODULES = ("__init__", "scheduler")
_SHEBANG = b"#!/usr/bin/env python3\n"
_ENTRY = b"import sys\n\nfrom celery_fleet.elector.cli import main\n\nsys.exit(main())\n"
_EPOCH = (1980, 1, 1, 0, 0, 0)


def package_dir() -> Path:
    return Path(__file__).resolve().parent


def members() -> list[tuple[str, bytes]]:
    """(archive name, content) of every member, in archive order."""
    here = package_dir()
    out = [("__main__.py", _ENTRY), ("celery_fleet/__init__.py", (here.parent / "__init__.py").read_bytes())]
    for module in BUNDLED_MODULES:
        out.append((f"celery_fleet/elector/{module}.py", (here / f"{module}.py").read_bytes()))
    for module in BUNDLED_BEAT_MODULES:
        out.append((f"celery_fleet/beat/{module}.py", (here.parent / "beat" / f"{module}.py").read_bytes()))
    return out


def build_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members():
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, content)
    return _SHEBANG + buffer.getvalue()


def build(target: Path) -> Path:
    """Write the archive to `target` atomically (world-readable: pods run it as another UID)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.write_bytes(build_bytes())
    os.chmod(tmp, 0o444)
    os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m celery_fleet.elector.bundle OUT.pyz\n")
        return 2
    build(Path(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
