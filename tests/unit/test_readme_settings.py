"""Every setting is in the README's configuration table, and every row there is a setting:
operators configure the service from that table."""

from __future__ import annotations

import dataclasses
import re

from service.config import ENV_PREFIX, Settings
from tests.conftest import REPO_ROOT


def test_the_configuration_table_names_every_setting_and_nothing_else() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(rf"^\| `({ENV_PREFIX}[A-Z0-9_]+)` \|", section, re.MULTILINE))
    settings = {f"{ENV_PREFIX}{field.name.upper()}" for field in dataclasses.fields(Settings)}
    assert rows == settings
