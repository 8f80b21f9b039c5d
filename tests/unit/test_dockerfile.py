"""The Dockerfile's rules, checked on its parsed instructions (no image can be built here).

tests/integration/test_deploy_dockerfile.py replays its install steps in a clean virtualenv.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from celery_fleet.planning.beat_workload import ELECTOR_SOURCE

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
PINNED_BASE = re.compile(r"^python:3\.11\.\d+-slim(-bookworm|-trixie)?$")
NON_ROOT_UID = "65532"


@dataclass
class Instruction:
    keyword: str
    value: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form's arguments, or None for the shell form."""
        try:
            parsed = json.loads(self.value)
        except ValueError:
            return None
        return [str(v) for v in parsed] if isinstance(parsed, list) else None

    def flags_and_args(self) -> tuple[dict[str, str], list[str]]:
        """`--from=build a b` -> ({"from": "build"}, ["a", "b"])."""
        words = shlex.split(self.value)
        flags = {}
        while words and words[0].startswith("--"):
            key, _, value = words.pop(0)[2:].partition("=")
            flags[key] = value
        return flags, words


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Instructions with line continuations joined and comments dropped, grouped by stage.

    Returns the global ARGs (those before the first FROM, with defaults) and the stages, with
    `${VAR}` in FROM lines substituted from those ARGs.
    """
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comments inside a continued instruction are dropped by Docker too
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, value = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.value.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m[1] or m[2]], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            assert ins.keyword == "ARG", f"line {ins.line}: only ARG may come before FROM"
            key, _, default = ins.value.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(ins)
    return global_args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse(DOCKERFILE.read_text())[1]


def test_parser_handles_continuations_comments_and_stages() -> None:
    text = 'ARG BASE=python:3.11.9-slim\nFROM ${BASE} AS b\n# c\nRUN a \\\n  # inner\n  && b\nFROM $BASE\nCMD ["x"]\n'
    args, parsed = parse(text)
    assert args == {"BASE": "python:3.11.9-slim"}
    assert [(s.base, s.name) for s in parsed] == [("python:3.11.9-slim", "b"), ("python:3.11.9-slim", None)]
    assert parsed[0].instructions == [Instruction("RUN", "a  && b", 4)]
    assert parsed[1].instructions[0].exec_form() == ["x"]


def test_multi_stage_on_one_pinned_slim_python(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "multi-stage: build, then a clean final stage"
    for stage in stages:
        assert PINNED_BASE.match(stage.base), f"{stage.base}: pin python:3.11.<patch>-slim[-bookworm]"
    # The venv copied into the final stage links to the build stage's interpreter.
    assert len({s.base for s in stages}) == 1


def test_final_stage_has_no_build_tools(stages: list[Stage]) -> None:
    final = stages[-1]
    # Nothing is installed or compiled in the final stage: it only copies the built venv.
    assert not final.all("RUN"), "the final stage must not RUN anything (no compilers, no pip)"
    for copy in final.all("COPY"):
        flags, _ = copy.flags_and_args()
        assert flags.get("from") == stages[0].name, f"line {copy.line}: the final stage copies only from the build"
    for stage in stages:
        for run in stage.all("RUN"):
            assert not re.search(r"apt-get|apk |gcc|build-essential|make ", run.value), f"line {run.line}"


def test_dependencies_come_from_the_hashed_lock_files(stages: list[Stage]) -> None:
    installs = [
        cmd.strip()
        for stage in stages
        for run in stage.all("RUN")
        for cmd in run.value.split("&&")
        if " install " in cmd
    ]
    assert installs
    for cmd in installs:
        if "-r " in cmd:
            assert "--require-hashes" in cmd and "--only-binary=:all:" in cmd, cmd
            assert re.search(r"-r requirements(-build)?\.lock\b", cmd), cmd
        else:
            # Only our own freshly built wheel is installed without the lock, and without deps.
            assert "--no-deps" in cmd and "celery_fleet-" in cmd and cmd.endswith(".whl"), cmd


def test_lock_files_pin_and_hash_everything() -> None:
    for name in ("requirements.lock", "requirements-build.lock"):
        text = (ROOT / name).read_text()
        requirements = re.findall(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;\\]+)", text, flags=re.M)
        assert requirements, name
        entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[-1])
        for entry in entries:
            if entry.strip() and not entry.startswith("#"):
                assert "==" in entry and "--hash=sha256:" in entry, f"{name}: unpinned or unhashed: {entry[:80]}"


def test_lock_file_covers_the_project_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked = {
        re.sub(r"[-_.]+", "-", n).lower()
        for n in re.findall(r"^([A-Za-z0-9_.\-]+)==", (ROOT / "requirements.lock").read_text(), flags=re.M)
    }
    for requirement in project["dependencies"]:
        name = re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0]).lower()
        assert name in locked, f"{name} is in pyproject.toml but not in requirements.lock: re-lock"


def test_runs_as_a_fixed_non_root_uid(stages: list[Stage]) -> None:
    users = stages[-1].all("USER")
    assert users, "the final stage must set USER"
    uid, _, gid = users[-1].value.partition(":")
    assert uid == NON_ROOT_UID and gid in ("", NON_ROOT_UID), "numeric, so runAsNonRoot can verify it"


def test_entrypoint_is_celery_fleet_run(stages: list[Stage]) -> None:
    final = stages[-1]
    assert final.all("ENTRYPOINT")[-1].exec_form() == ["celery-fleet"]
    assert final.all("CMD")[-1].exec_form() == ["run"]


def test_elector_ships_where_beat_pods_copy_it_from(stages: list[Stage]) -> None:
    build = stages[0]
    placed = [run for run in build.all("RUN") if ELECTOR_SOURCE in run.value]
    assert placed, f"the build stage must put the elector at {ELECTOR_SOURCE}"
    cmd = shlex.split(placed[0].value)
    # Built from the installed package by the bundler (which makes it world-readable: beat pods copy
    # it as another UID), not copied from a source file: one source, the package.
    assert cmd[-3:] == ["-m", "celery_fleet.elector.bundle", ELECTOR_SOURCE], cmd
    assert cmd[0].endswith("/venv/bin/python"), "the image's own interpreter, with the package installed"
    copied = [c.flags_and_args()[1] for c in stages[-1].all("COPY")]
    assert any(Path(ELECTOR_SOURCE).is_relative_to(args[0]) for args in copied), "copied into the final stage"


def test_copy_sources_exist_and_pass_dockerignore(stages: list[Stage]) -> None:
    patterns = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:  # the last matching pattern wins, as in Docker
            negate = pattern.startswith("!")
            body = pattern[1:] if negate else pattern
            if fnmatch.fnmatch(path, body.rstrip("/")) or fnmatch.fnmatch(path, body.rstrip("/") + "/*"):
                result = not negate
        return result

    for stage in stages:
        for copy in stage.all("COPY"):
            flags, args = copy.flags_and_args()
            if "from" in flags:
                continue
            for source in args[:-1]:
                assert (ROOT / source).exists(), f"line {copy.line}: {source} does not exist"
                assert not ignored(source), f"line {copy.line}: {source} is excluded by .dockerignore"
    assert ignored(".venv") and ignored("tests") and ignored(".local"), "keep the build context small"
