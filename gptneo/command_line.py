"""The programs' entry: their command lines read before TensorFlow loads, then the heavy
imports in the one order that works.

Every program in bin/ defines its flags, then calls `start()` and only then imports what it
uses: `--help` answers at once (exit 0, the program's flags and the gin flags), and a bad or
missing flag is one line and exit code 2 before the 5-20 s TensorFlow takes to load.
`gin_utils.run` parses through `parse` too (a second call does nothing), for a program or
test that did not parse first.

Light on purpose: absl and the standard library only, until `start` has read the flags.
"""
import importlib
import os
import sys

from absl import app
from absl import flags
from absl import logging  # noqa: F401  (defines --verbosity and the other logging flags)

FLAGS = flags.FLAGS
HELP = ("-h", "-?", "--help", "--helpshort")
HELP_FULL = "--helpfull"


def define_gin_flags():
  """--gin_file and --gin_param, for the programs configured with gin."""
  flags.DEFINE_multi_string("gin_file", [], "Gin file to load; repeatable. Looked up relative "
                            "to the working directory, then in the shipped gin/ folder "
                            "(gin/tiny.gin works from any folder).")
  flags.DEFINE_multi_string("gin_param", [], "Gin binding, e.g. 'GPT.n_layer = 4'; repeatable.")


def define_checkpoint_step_flag():
  """--checkpoint_step, for the programs that read a model dir's weights."""
  flags.DEFINE_integer("checkpoint_step", None, "Read the checkpoint of this step (it must be "
                       "kept and intact) instead of the newest; train.init_from_step does the "
                       "same for train.init_from.", lower_bound=0)


def parse(argv: list | None = None) -> list:
  """Reads the command line into FLAGS once: help printed (exit 0), errors refused in one line.

  absl's flag errors (unknown flag, missing value, a required flag unset) become our one line
  and exit code 2. No program takes positional arguments: one left after the flags (`extra`,
  a `false` meant for a boolean flag) is refused too, rather than silently ignored.

  Args:
    argv: the command line, program name first (default sys.argv).

  Returns:
    [program]: what absl passes on to the program's main.
  """
  argv = sys.argv if argv is None else argv
  if FLAGS.is_parsed():  # the program parsed before its heavy imports; gin_utils.run again
    return argv[:1]
  program = os.path.basename(argv[0])
  arguments = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  if any(argument in HELP for argument in arguments):
    print(usage(argv[0]))
    sys.exit(0)
  if HELP_FULL in arguments:
    print(FLAGS.get_help())
    sys.exit(0)
  app.define_help_flags()  # --helpxml and the rest stay absl's
  try:
    remaining = FLAGS(argv)
  except flags.Error as error:
    _refuse(program, str(error).strip().splitlines()[0])
  if len(remaining) > 1:
    _refuse(program, f"unexpected arguments {remaining[1:]}; every input is a flag "
                     f"(--name=value; bindings go in --gin_param)")
  return remaining


def start(argv: list | None = None, training_stack: bool = True) -> list:
  """Every program's first call, once its flags are defined: the rules of its start in one place.

  1. The command line (`parse`): help and bad flags answered before anything heavy loads.
  2. `load_training_stack()`, unless training_stack=False: a program that may only read JSON
     (gptneo-sweep --status, --report) calls it itself when it needs it.

  Args:
    argv: the command line, program name first (default sys.argv).
    training_stack: load it now.

  Returns:
    [program]: what absl passes on to the program's main.
  """
  remaining = parse(argv)
  if training_stack:
    load_training_stack()
  return remaining


def load_training_stack() -> None:
  """OR-Tools, then every gin configurable (so TensorFlow), in the one order that works.

  1. OR-Tools, before TensorFlow: loaded the other way round, CP-SAT segfaults (the layout
     search: bin/train --auto_layout, bin/search_layout).
  2. gptneo.configurables: every gin configurable registered, TensorFlow loaded (by
     quiet_tensorflow) with its C++ start-up banner silenced (and TF_CPP_MIN_LOG_LEVEL set by
     gptneo/__init__.py).
  """
  importlib.import_module("gptneo.layout_search.search")  # OR-Tools first: see above
  importlib.import_module("gptneo.configurables")


def usage(program_path: str) -> str:
  """The short help: the program's docstring, its own flags, the common ones it has.

  Args:
    program_path: sys.argv[0], under which absl files the main program's flags.
  """
  doc = (getattr(sys.modules.get("__main__"), "__doc__", None) or "").strip()
  parts = [doc] if doc else []
  parts.append(FLAGS.module_help(program_path))
  # The flags defined here (gin's, --checkpoint_step) that this program has, if any; absl
  # heads them with this module's name.
  parts.append(FLAGS.module_help(__name__).replace(f"{__name__}:", "common flags:", 1))
  parts.append(f"{HELP_FULL}: every flag, absl's too.")
  return "\n\n".join(part for part in parts if part.strip())


def _refuse(program, message):
  """Our one line for a command line absl can't take, exit 2."""
  print(f"{program}: error: {message} (see --help)", file=sys.stderr)
  sys.exit(2)
