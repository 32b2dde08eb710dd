"""System programs some tests need (Chromium, dciodvfy): found on PATH, else the test is skipped with
how to install it, or fails where CI requires the program (its BONEAGE_REQUIRE_* variable is 1, set by
.ci/run, which installs them)."""

from __future__ import annotations

import os
import shutil

import pytest


def find_program(names: tuple[str, ...]) -> str | None:
    """The first of `names` on PATH, else None."""
    return next((found for found in map(shutil.which, names) if found), None)


def program_or_skip(names: tuple[str, ...], label: str, require_env: str, install: str, purpose: str) -> str:
    """The path of the first of `names` on PATH; where there is none, a skip saying so and how to install
    it, or a failure when the environment variable `require_env` is 1."""
    found = find_program(names)
    if found is None:
        why = f"no {label} on PATH (looked for {', '.join(names)}): install it ({install}) {purpose}"
        if os.environ.get(require_env) == "1":
            pytest.fail(f"{why}; {require_env}=1 requires it")
        pytest.skip(why)
    return found
