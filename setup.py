"""gptneo: GPT-2/GPT-3-style language models on Mesh-TensorFlow, configured with gin."""
import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements(name):
  """The pins of requirements file `name`, with those of the files it includes (`-r`)."""
  pins = []
  for line in (_HERE / name).read_text().splitlines():
    if line.startswith("-r "):
      pins += _requirements(line[3:].strip())
    elif line and not line.startswith("#"):
      pins.append(line)
  return pins


def _programs():
  """bin/'s programs (not its helper module _venv.py): each is installed as gptneo-<name>."""
  return [p.name for p in sorted((_HERE / "bin").iterdir())
          if p.is_file() and not p.suffix and not p.name.startswith("_")]


def _console_scripts():
  """gptneo-import-hf = gptneo.programs:gptneo_import_hf, ...: see gptneo/programs.py."""
  return [f"gptneo-{name.replace('_', '-')} = gptneo.programs:gptneo_{name}"
          for name in _programs()]


def _dev_requirements():
  return [pin for pin in _requirements("requirements-dev.txt")
          if pin not in _requirements("requirements.txt")]


setuptools.setup(
    name="gptneo",
    version="0.1.0",
    description="Train GPT-style language models on Mesh-TensorFlow, every knob a gin binding.",
    python_requires=">=3.11,<3.12",
    # The configs and programs live at the top of the repo (`gin/`, `bin/`) and install as
    # `gptneo/gin` and `gptneo/bin`; the commands (gptneo-train, ...) run the programs there.
    packages=[*setuptools.find_packages(include=["gptneo", "gptneo.*"]), "gptneo.gin",
              "gptneo.bin"],
    package_dir={"gptneo.gin": "gin", "gptneo.bin": "bin"},
    package_data={"gptneo.gin": ["*.gin", "*/*.gin"], "gptneo.bin": ["_venv.py", *_programs()],
                  "gptneo.harness.tasks": ["*.yaml", "*.jsonl"]},  # the offline harness tasks
    entry_points={"console_scripts": _console_scripts()},
    install_requires=_requirements("requirements.txt"),
    extras_require={"dev": _dev_requirements()},
)
