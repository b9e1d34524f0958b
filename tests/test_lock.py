"""requirements/lock.txt satisfies pyproject.toml: what `make test`, `make demo` and the images
install (the lock, as a pip constraints file) is a set that pyproject's ranges admit, pinned exactly.

A dependency added to pyproject.toml without `make lock`, or a range moved past the lock's pin,
fails here rather than installing an untested version. Offline: the two files are only parsed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="Python 3.11's tomllib reads pyproject.toml; the lock is for 3.11+")

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
GROUPS: dict[str, list[str]] = {"dependencies": PROJECT["dependencies"], **PROJECT["optional-dependencies"]}


def lock_lines(text: str) -> list[str]:
    """The requirement lines of a pip requirements file: comments, options and hashes dropped,
    backslash continuations joined."""
    lines = []
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "-")):
            lines.append(re.sub(r"\s--hash=\S+", "", line).strip())
    return lines


def parse_lock(text: str) -> dict[NormalizedName, Requirement]:
    pins: dict[NormalizedName, Requirement] = {}
    for line in lock_lines(text):
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name not in pins, f"{req.name} is pinned twice in the lock"
        pins[name] = req
    return pins


def pinned_version(req: Requirement) -> Version:
    """The version of an exact `name==V` pin; anything looser is an error."""
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, \
        f"{req}: the lock must pin with == and one exact version"
    return Version(specs[0].version)


def applies(req: Requirement) -> bool:
    """Whether a requirement holds for this interpreter and platform: the lock is resolved for one,
    so another's requirement (uvloop on Windows) is not in it."""
    return req.marker is None or req.marker.evaluate()


def unmet(project: dict[str, list[str]], pins: dict[NormalizedName, Requirement]) -> list[str]:
    """Each requirement (of this interpreter and platform) that the lock misses or pins outside
    its range, as a line naming the group."""
    problems = []
    for group, requirements in project.items():
        for text in requirements:
            req = Requirement(text)
            if not applies(req):
                continue
            pin = pins.get(canonicalize_name(req.name))
            if pin is None:
                problems.append(f"[{group}] {text}: not in the lock (run `make lock`)")
            elif not req.specifier.contains(pinned_version(pin), prereleases=True):
                problems.append(f"[{group}] {text}: the lock pins {pin}")
    return problems


@pytest.fixture(scope="module")
def pins() -> dict[NormalizedName, Requirement]:
    assert LOCK.is_file(), f"{LOCK.relative_to(ROOT)} is missing: run `make lock`"
    return parse_lock(LOCK.read_text(encoding="utf-8"))


def test_every_lock_entry_is_an_exact_pin(pins: dict[NormalizedName, Requirement]) -> None:
    for req in pins.values():
        version = pinned_version(req)
        # A local label (2.13.0+cpu) names a build only its own index serves.
        assert version.local is None, f"{req}: no local version label in the lock"
    assert canonicalize_name(PROJECT["name"]) not in pins, "the lock pins queuebert itself"


def test_lock_satisfies_pyproject(pins: dict[NormalizedName, Requirement]) -> None:
    assert unmet(GROUPS, pins) == []


def test_lock_names_each_direct_dependency(pins: dict[NormalizedName, Requirement]) -> None:
    direct = {canonicalize_name(r.name) for reqs in GROUPS.values() for r in map(Requirement, reqs) if applies(r)}
    assert sorted(direct - set(pins)) == []


def test_torch_pins_agree(pins: dict[NormalizedName, Requirement]) -> None:
    """The Makefile installs $(TORCH) with the lock as constraints, and the images TORCH_VERSION:
    a default that disagrees with the lock fails to resolve."""
    locked = pinned_version(pins[canonicalize_name("torch")])
    makefile = re.search(r"^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)
    assert makefile and Version(makefile.group(1)) == locked
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        arg = re.search(r"^ARG TORCH_VERSION=(\S+)$", (ROOT / "docker" / name).read_text(encoding="utf-8"), re.M)
        assert arg and Version(arg.group(1)) == locked, name


def test_the_check_sees_a_bad_lock() -> None:
    """The checks above fail on a lock that misses a package, pins outside a range or pins loosely."""
    project = {"dependencies": ["redis[hiredis]>=5.0,<9", "rq>=3.0,<4"],
               "http": ["uvloop>=0.19; sys_platform == 'nonesuch'"], "test": ["pytest>=8"]}
    lock = parse_lock("# header\nredis==9.0.0\n    # via queuebert\nrq==3.0.0 \\\n    --hash=sha256:ab\n")
    assert unmet(project, lock) == ["[dependencies] redis[hiredis]>=5.0,<9: the lock pins redis==9.0.0",
                                    "[test] pytest>=8: not in the lock (run `make lock`)"]
    with pytest.raises(AssertionError, match="must pin with =="):
        pinned_version(Requirement("rq>=3.0"))
    with pytest.raises(AssertionError, match="pinned twice"):
        parse_lock("rq==3.0.0\nRQ==3.0.1\n")
