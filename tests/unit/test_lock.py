"""The dependency locks must match pyproject.toml, and say how to fix it when they do not."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from tools.lock import LOCKS, LockError, check, pins

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of what the lock check reads: pyproject.toml and requirements/."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    return tmp_path


def test_the_committed_locks_match_pyproject() -> None:
    check(ROOT)


def test_every_lock_pins_every_package_with_a_hash() -> None:
    for lock in LOCKS:
        text = (ROOT / lock.path).read_text()
        assert "fastapi" in pins(text)
        assert "setuptools" in pins(text), "the editable install builds with locked setuptools"
        # An entry is a pin line and its indented continuation lines (hashes, "# via").
        entries = re.split(r"\n(?=\S)", text)
        pinned = [e for e in entries if not e.startswith("#")]
        assert len(pinned) >= len(pins(text))
        for entry in pinned:
            assert "==" in entry.splitlines()[0], entry
            assert "--hash=sha256:" in entry, entry


def test_a_changed_range_without_a_refresh_fails_with_the_fix(checkout: Path) -> None:
    pyproject = checkout / "pyproject.toml"
    text = pyproject.read_text()
    assert '"orjson>=3.10"' in text
    pyproject.write_text(text.replace('"orjson>=3.10"', '"orjson>=3.11"'))
    with pytest.raises(LockError, match=r"make lock") as raised:
        check(checkout)
    assert "requirements/run.txt" in str(raised.value)
    assert "requirements/dev.txt" in str(raised.value)


def test_a_pin_outside_its_range_is_named(checkout: Path) -> None:
    pyproject = checkout / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"orjson>=3.10"', '"orjson<3"'))
    with pytest.raises(LockError, match=r"pins orjson==[0-9.]+, outside orjson<3"):
        check(checkout)


def test_a_new_dependency_without_a_refresh_fails(checkout: Path) -> None:
    pyproject = checkout / "pyproject.toml"
    text = pyproject.read_text()
    pyproject.write_text(text.replace('"orjson>=3.10",', '"orjson>=3.10",\n    "humanize>=4",'))
    with pytest.raises(LockError, match=r"pins no version of humanize"):
        check(checkout)


def test_the_dev_lock_installs_the_cpu_build_of_torch() -> None:
    # PyPI's torch for Linux is a multi-GB CUDA build; the suite runs on the CPU build.
    dev = pins((ROOT / "requirements/dev.txt").read_text())
    assert str(dev["torch"]).endswith("+cpu")
