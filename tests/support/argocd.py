"""Argo CD's view of our objects: the chart's health script run by a real Lua runtime (lupa).

Argo CD runs `resource.customizations.health.<group>_<Kind>` scripts in gopher-lua (Lua 5.1) with the
object as the global `obj` (JSON arrays as 1-based tables) and takes the returned table's status and
message; LuaJIT is Lua 5.1 too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lupa.luajit21 as lupa

ROOT = Path(__file__).resolve().parents[2]
HEALTH_SCRIPT = ROOT / "charts" / "celery-fleet" / "argocd" / "health.lua"
STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def argocd_health(obj: dict[str, Any]) -> tuple[str, str]:
    """(health status, message) as Argo CD would show them for `obj`."""
    lua = lupa.LuaRuntime()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(HEALTH_SCRIPT.read_text())
    status, message = result["status"], result["message"]
    assert status in STATUSES, status
    return str(status), str(message or "")
