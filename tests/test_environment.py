"""environment.yml carries exactly the pins of pyproject.toml."""

import re
import tomllib

from study import config


def test_conda_environment_has_the_same_pins_as_pyproject():
    project = tomllib.loads((config.ROOT / "pyproject.toml").read_text())["project"]
    pins = set(project["dependencies"]) | {p for extra in project["optional-dependencies"].values() for p in extra}
    conda = set(re.findall(r"^\s+- ([A-Za-z0-9_.-]+==[^\s]+)$", (config.ROOT / "environment.yml").read_text(), re.M))
    assert pins == conda
    assert all("==" in pin for pin in pins)
