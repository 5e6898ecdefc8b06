"""The README documents what the code really reads and runs."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import ENV_VARS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented_in_the_configuration_table() -> None:
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`((?:ETL|DATABASE)_[A-Z_]+)`", section))
    assert documented == set(ENV_VARS)


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)


def test_guarantees_name_tests_that_exist() -> None:
    section = README.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    cited = re.findall(r"`(test_\w+\.py)(?:::(\w+\*?))?`|`::(\w+)`", section)
    assert len(cited) > 15
    current = ""
    for file, name, sibling in cited:
        current = file or current
        source = (ROOT / "tests" / current).read_text()
        wanted = name or sibling
        if wanted:
            pattern = re.escape(wanted.rstrip("*")) + (r"\w*" if wanted.endswith("*") else r"\b")
            assert re.search(rf"def {pattern}", source), f"{current}::{wanted}"
