"""The docs: the config reference lists every knob as the code defines it; the README is the
front door (the two commands, links that resolve); tpu.md and gpu.md match the profiles."""
import re

from gptneo import configurables
from gptneo import gin_reference
from gptneo import gin_utils
from tests.conftest import REPO


def test_config_reference_is_current():
  reference = (REPO / "docs" / "config_reference.md").read_text()
  assert gin_reference.with_reference(reference) == reference, (
      "docs/config_reference.md is stale: run "
      "`python -m gptneo.gin_reference docs/config_reference.md`")


def test_readme_is_a_front_door_whose_links_resolve():
  readme = (REPO / "README.md").read_text()
  assert len(readme.encode()) < 16000, "README.md is a front door: move detail into docs/"
  for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
      assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


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


def pins(name):
  """{package: version} of a requirements file's exact pins (its includes left out)."""
  lines = (REPO / name).read_text().splitlines()
  return dict(re.fullmatch(r"([\w\-\[\]]+)==(\S+)", line).groups() for line in lines
              if "==" in line and not line.startswith("#"))


def doc_commands(text):
  """The shell commands of a doc's indented or fenced blocks, continuation lines joined."""
  blocks = re.findall(r"(?m)^(?: {4}.*\n?)+", text) + re.findall(r"```sh\n(.*?)```", text, re.S)
  commands = []
  for block in blocks:
    commands += [line.strip() for line in re.sub(r"\\\n\s*", " ", block).splitlines()
                 if line.strip()]
  return commands


def test_tpu_doc_is_consistent_with_the_tpu_profile():
  """docs/tpu.md's runtime image, install command, libtpu, layout files, chip names and
  programs are those of requirements-tpu.txt, the Makefile and the code."""
  from gptneo import flops  # pylint: disable=g-import-not-at-top
  doc = (REPO / "docs" / "tpu.md").read_text()
  commands = doc_commands(doc)
  tpu_pins = pins("requirements-tpu.txt")
  images = re.findall(r"tpu-vm-tf-([\d.]+)-(?:pod-)?pjrt", doc)
  assert images and set(images) == {tpu_pins["tensorflow-tpu"]}
  assert "make install PROFILE=tpu" in commands
  assert "REQUIREMENTS_tpu := requirements-tpu.txt" in (REPO / "Makefile").read_text()
  assert f"libtpu=={tpu_pins['libtpu']}" in doc
  for layout in re.findall(r"layouts/([\w{},]+)\.gin", doc):
    stem, _, sizes = layout.partition("{")
    for name in [stem + size for size in sizes.rstrip("}").split(",")] if sizes else [stem]:
      if not name.startswith("search_"):  # what gptneo-search-layout writes
        assert (REPO / "gin" / "layouts" / f"{name}.gin").is_file(), name
  for chip in re.findall(r"tpu_v\d\w?(?=['`\"])", doc):
    assert chip in flops.PEAK_FLOPS, chip
  assert_programs_have_their_flags(commands)


def assert_programs_have_their_flags(commands):
  """Every .venv/bin/gptneo-* command names one of our programs, with flags it defines."""
  from gptneo import programs  # pylint: disable=g-import-not-at-top
  for command in commands:
    program = re.match(r"\.venv/bin/gptneo-([\w-]+)", command)
    if program:
      name = program.group(1).replace("-", "_")
      assert name in programs.PROGRAMS, command
      defined = set(re.findall(r'DEFINE_\w+\(\s*"(\w+)"', (REPO / "bin" / name).read_text()))
      for flag in re.findall(r"--(\w+)=", command):
        assert flag in defined | {"gin_file", "gin_param"}, (flag, command)


def test_gpu_doc_is_consistent_with_the_gpu_profile():
  """docs/gpu.md's install command is the Makefile's, TF the CPU profile's with CUDA, the
  Hopper note and the first-run check there, and its programs take the flags it shows."""
  assert pins("requirements-gpu.txt")["tensorflow[and-cuda]"] == pins(
      "requirements.txt")["tensorflow"]
  assert "REQUIREMENTS_gpu := requirements-gpu.txt" in (REPO / "Makefile").read_text()
  doc = (REPO / "docs" / "gpu.md").read_text()
  commands = doc_commands(doc)
  assert "make install PROFILE=gpu" in commands
  assert "sm_60 to sm_89" in doc and "compute_90" in doc
  assert ".venv/bin/gptneo-gpu-check" in commands
  assert_programs_have_their_flags(commands)
