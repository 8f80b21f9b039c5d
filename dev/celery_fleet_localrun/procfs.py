"""Is a local worker connected to its broker? Read from /proc, per process tree.

The operator's readiness probe (``planning.workload.BROKER_CONNECTED_PROBE``) passes when the
pod's network namespace holds an established TCP connection to the broker's port. Local
processes share this machine's network namespace, so the same question is asked of the
process tree instead: does the container's main process, or one of its descendants, own a
socket that is ESTABLISHED to that port? Nothing is sent to the broker.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TCP_ESTABLISHED = "01"
PROC = Path("/proc")


@dataclass(frozen=True)
class TcpSocket:
    remote_port: int
    state: str
    inode: int


def parse_net_tcp(text: str) -> list[TcpSocket]:
    """Rows of /proc/net/tcp or /proc/net/tcp6 (the header line is skipped)."""
    sockets: list[TcpSocket] = []
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 10:
            continue
        try:
            port = int(cols[2].rsplit(":", 1)[1], 16)
            sockets.append(TcpSocket(remote_port=port, state=cols[3], inode=int(cols[9])))
        except (IndexError, ValueError):
            continue
    return sockets


def connected_inodes(sockets: Iterable[TcpSocket], port: int) -> set[int]:
    return {s.inode for s in sockets if s.state == TCP_ESTABLISHED and s.remote_port == port and s.inode}


def socket_inode(link: str) -> int | None:
    """The inode of an fd link such as 'socket:[12345]'."""
    if link.startswith("socket:[") and link.endswith("]"):
        try:
            return int(link[8:-1])
        except ValueError:
            return None
    return None


def descendants(pid: int, proc: Path = PROC) -> list[int]:
    """pid and every process below it (via /proc/<pid>/task/*/children)."""
    seen: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.append(current)
        try:
            tasks = list((proc / str(current) / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                stack.extend(int(child) for child in (task / "children").read_text().split())
            except (OSError, ValueError):
                continue
    return seen


def owned_socket_inodes(pids: Iterable[int], proc: Path = PROC) -> set[int]:
    inodes: set[int] = set()
    for pid in pids:
        fd_dir = proc / str(pid) / "fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            try:
                inode = socket_inode(os.readlink(fd_dir / name))
            except OSError:
                continue
            if inode is not None:
                inodes.add(inode)
    return inodes


def connected_to_port(pid: int, port: int, proc: Path = PROC) -> bool:
    """True when pid's process tree has an ESTABLISHED TCP connection to `port`."""
    rows: list[TcpSocket] = []
    for table in ("tcp", "tcp6"):
        try:
            rows += parse_net_tcp((proc / "net" / table).read_text())
        except OSError:
            continue
    wanted = connected_inodes(rows, port)
    if not wanted:
        return False
    return bool(wanted & owned_socket_inodes(descendants(pid, proc), proc))
