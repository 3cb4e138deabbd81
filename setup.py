"""gptneo: GPT-2/GPT-3-style language models on Mesh-TensorFlow, configured with gin."""
import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements(name):
  lines = (_HERE / name).read_text().splitlines()
  return [l for l in lines if l and not l.startswith(("#", "-r"))]


def _dev_requirements():
  return _requirements("requirements-interop.txt") + _requirements("requirements-dev.txt")


setuptools.setup(
    name="gptneo",
    version="0.1.0",
    description="Train GPT-style language models on Mesh-TensorFlow, every knob a gin binding.",
    python_requires=">=3.11,<3.12",
    # The configs live at the top of the repo (`gin/`) and install as `gptneo/gin`.
    packages=setuptools.find_packages(include=["gptneo", "gptneo.*"]) + ["gptneo.gin"],
    package_dir={"gptneo.gin": "gin"},
    package_data={"gptneo.gin": ["*.gin", "*/*.gin"]},
    scripts=[str(p) for p in sorted((_HERE / "bin").iterdir()) if p.is_file()],
    install_requires=_requirements("requirements.txt"),
    extras_require={"dev": _dev_requirements()},
)
