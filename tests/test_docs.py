"""The README's config reference lists every knob as the code defines it."""
from gptneo import gin_reference
from tests.conftest import REPO


def test_readme_reference_is_current():
  readme = (REPO / "README.md").read_text()
  assert gin_reference.with_reference(readme) == readme, (
      "README's config reference is stale: run `python -m gptneo.gin_reference README.md`")


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
  readme = (REPO / "README.md").read_text()
  assert "make demo" in readme and "make test" in readme
  assert "make test" in (REPO / ".ci" / "run").read_text()
