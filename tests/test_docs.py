"""The README says what the code does: the generated catalog is current and its
commands exist."""

from __future__ import annotations

import os
from pathlib import Path

from schemas.export import catalog_markdown

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_readme_event_catalog_matches_the_schemas() -> None:
    inside = README.split("<!-- catalog:start -->", 1)[1].split("<!-- catalog:end -->", 1)[0]
    assert inside.strip() == catalog_markdown().strip(), "run: callplane schemas catalog --readme README.md"


def test_the_two_readme_commands_exist_and_are_executable() -> None:
    for command in ("script/up", "script/test"):
        assert f"./{command}" in README
        assert os.access(ROOT / command, os.X_OK)


def test_ci_runs_the_readme_test_command() -> None:
    assert "script/test" in (ROOT / ".ci" / "run").read_text()
