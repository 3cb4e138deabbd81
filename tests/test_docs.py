"""The README's config reference lists every knob as the code defines it."""
import re

from gptneo import configurables
from gptneo import gin_reference
from gptneo import gin_utils
from tests.conftest import REPO


def test_readme_reference_is_current():
  readme = (REPO / "README.md").read_text()
  assert gin_reference.with_reference(readme) == readme, (
      "README's config reference is stale: run `python -m gptneo.gin_reference README.md`")


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
  readme = (REPO / "README.md").read_text()
  assert "make demo" in readme and "make test" in readme
  assert "make test" in (REPO / ".ci" / "run").read_text()


def listed_modules():
  return {m.__name__ for m in configurables.KNOBS} | {m.__name__ for *_, m in
                                                      configurables.CHOICES}


def test_every_module_that_registers_is_in_the_registration_point():
  registering = set()
  for path in (REPO / "gptneo").rglob("*.py"):
    if re.search(r"gin\.(configurable|register|external_configurable)\b", path.read_text()):
      parts = path.relative_to(REPO).with_suffix("").parts
      registering.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))  # a package
  assert registering <= listed_modules()


def test_every_registered_configurable_is_in_the_reference():
  reference = gin_reference.reference()
  assert {c.module for c in gin_utils.registered()} <= listed_modules()
  for configurable in gin_utils.registered():
    assert f"`{configurable.name}" in reference or f"`@{configurable.name}" in reference, (
        configurable.name)
