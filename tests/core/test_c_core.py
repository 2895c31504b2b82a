"""The C core builds clean under strict C11 warnings, on its own, outside cffi."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.parametrize("unit", sorted(p.name for p in CSRC.glob("*.c")))
def test_c_unit_compiles_without_warnings_as_strict_c11(tmp_path, unit):
    result = subprocess.run(
        [
            "cc",
            "-std=c11",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-c",
            "-I",
            sysconfig.get_paths()["include"],  # shmbus_pydecode.c is a CPython module
            str(CSRC / unit),
            "-o",
            str(tmp_path / "unit.o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_cffi_declarations_match_the_header():
    """Every function cffi declares is declared, identically, in a C header."""
    header = " ".join(" ".join(p.read_text() for p in CSRC.glob("shmbus_*.h")).split())
    checked = 0
    for decl in (CSRC / "shmbus_cdef.h").read_text().split(";"):
        code = [ln for ln in decl.splitlines() if not ln.strip().startswith(("/*", "*", "#"))]
        decl = " ".join(code)
        decl = " ".join(decl.split())
        if "(" in decl:
            assert decl + ";" in header, f"cdef and header disagree on: {decl}"
            checked += 1
    assert checked >= 20
