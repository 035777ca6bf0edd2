"""The install story: one supported Python range, stated alike by pyproject.toml, tools/find-python and the
Makefile, and an interpreter outside it refused with a message that names the versions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIND_PYTHON = ROOT / "tools" / "find-python"


def _fake_python(folder: Path, version: tuple[int, int, int]) -> Path:
    """An executable that behaves like this interpreter but reports ``version``."""
    path = folder / f"python{version[0]}.{version[1]}"
    patch = f"import sys; sys.version_info = ({version[0]}, {version[1]}, {version[2]}, 'final', 0)"
    path.write_text(
        f'#!/bin/sh\n[ "$1" = -c ] && exec "{sys.executable}" -c "{patch}; $2"\nexec "{sys.executable}" "$@"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _find(env_python: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": str(env_python)}
    return subprocess.run([str(FIND_PYTHON)], capture_output=True, text=True, env=env, check=False)


@pytest.mark.parametrize("version", [(3, 11, 7), (3, 14, 0)])
def test_find_python_refuses_a_version_outside_the_range(tmp_path, version):
    result = _find(_fake_python(tmp_path, version))
    assert result.returncode == 1 and result.stdout == ""
    assert f"is Python {version[0]}.{version[1]}.{version[2]}; captum_chefer needs Python 3.12 or 3.13" in result.stderr
    assert ">= 3.12 and < 3.14" in result.stderr


@pytest.mark.parametrize("version", [(3, 12, 1), (3, 13, 0)])
def test_find_python_takes_a_version_inside_the_range(tmp_path, version):
    fake = _fake_python(tmp_path, version)
    result = _find(fake)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == sys.executable  # the interpreter behind the fake, as it names itself


def test_one_range_everywhere():
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert sorted(part.strip() for part in spec.split(",")) == ["<3.14", ">=3.12"]
    assert "(3, 12) <= sys.version_info[:2] < (3, 14)" in FIND_PYTHON.read_text()
    assert "(3, 12) <= sys.version_info[:2] < (3, 14)" in (ROOT / "Makefile").read_text()


def test_license_is_the_declared_one():
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert spec == "BSD-3-Clause"  # an SPDX expression
    assert (ROOT / "LICENSE").read_text().startswith("BSD 3-Clause License")
