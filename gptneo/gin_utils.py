"""The gin helper every binary shares: flags, search path, parsing, errors, operative config,
what a model dir's config may set, and the one writer of gin values (gin_literal).

A leaf: of gptneo it imports only errors and command_line (the flags), and no TensorFlow
(configurables loads it), so what only reads gin text or JSON (gptneo-sweep --status) starts
at once. What parse can bind is what is registered when it runs; binaries (and tests) import
gptneo.configurables, the one registration point, first.
"""
import contextlib
import difflib
import inspect
import io
import math
import os
import pathlib
import re
import sys
import tokenize
import traceback

from absl import app
from absl import flags
import gin
from gin import config_parser

from gptneo import command_line
from gptneo.errors import EXIT_DIVERGED, Diverged, UserError


FLAGS = flags.FLAGS
OUR_PACKAGE = "gptneo"


def shipped_gin_dir():
  """The `gin/` folder shipped with the package (installed) or at the repo root (source)."""
  package_dir = pathlib.Path(__file__).resolve().parent
  for candidate in (package_dir / "gin", package_dir.parent / "gin"):
    if candidate.is_dir():
      return candidate
  raise UserError(f"no gin/ folder next to {package_dir}; reinstall with `make install`")


def _registry():
  """gin's registry of configurables: complete selector -> gin.config.Configurable.

  gin 0.5 has no public way to list what is registered, so this one place reads its private
  SelectorMap.
  """
  return gin.config._REGISTRY  # pylint: disable=protected-access


def _is_ours(configurable):
  return configurable.module.split(".")[0] == OUR_PACKAGE


def registered(module=None):
  """gptneo's configurables, in the order they were registered.

  Args:
    module: if given (e.g. gptneo.model.ops), only the configurables that module registers.

  Returns:
    gin's records of them (name, wrapped function or class, module, denylist, ...).
  """
  return [configurable for _, configurable in _registry().items() if _is_ours(configurable)
          and (module is None or configurable.module == module.__name__)]


def _our_configurable(selector, ours=True):
  """The one gptneo configurable `selector` (e.g. "GPT" or "gpt.GPT") names, else None; with
  ours=False, the one configurable of any package (mesh-tensorflow registers some)."""
  matches = _registry().get_all_matches(selector)
  return matches[0] if len(matches) == 1 and (_is_ours(matches[0]) or not ours) else None


@contextlib.contextmanager
def _include_lookup(gin_dir):
  """While gin parses, a relative `include` is looked up in gin_dir, then the working directory.

  So the shipped presets' includes (`include 'runs/train.gin'`) find the shipped files wherever
  the user stands. gin's own lookup tries the working directory first, then reads a path's
  folder as a Python package on sys.path: a `runs/` or `data/` folder beside a script or
  notebook is found as a namespace package without a file, and gin crashes on it.
  """
  # gin 0.5 can only append to its search path and readers, so they are swapped in place.
  prefixes = gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
  readers = gin.config._FILE_READERS  # pylint: disable=protected-access
  saved = prefixes[:], readers[:]
  prefixes[:] = [str(gin_dir), ""]
  readers[:] = [(open, os.path.isfile)]
  try:
    yield
  finally:
    prefixes[:], readers[:] = saved


def _gin_error_message(error):
  """gin's errors span several lines (with the config's context); the first names the culprit."""
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__


def shipped_candidates(name: str, gin_dir: pathlib.Path) -> list:
  """Where in the shipped gin/ folder `name` may be: as given, or without a leading `gin/`
  (a path into a checkout, e.g. gin/gpt3_xl.gin, that works wherever the user stands).

  Args:
    name: a gin file as the user named it.
    gin_dir: the shipped gin/ folder (shipped_gin_dir()).
  """
  candidates = [gin_dir / name]
  if pathlib.PurePath(name).parts[:1] == ("gin",):
    candidates.append(gin_dir / pathlib.PurePath(*pathlib.PurePath(name).parts[1:]))
  return candidates


def _find_gin_file(name, gin_dir):
  for candidate in (pathlib.Path(name), *shipped_candidates(name, gin_dir)):
    if candidate.is_file():
      return str(candidate.resolve())  # absolute: gin opens it without a search of its own
  raise UserError(f"gin file {name!r} not found in the working directory or in {gin_dir}")


# --- Writing gin text ---------------------------------------------------------------------

class Reference:
  """gin text that names, not a value: `@configurable`, `@configurable()` or `%MACRO`.

  gin_literal writes it as it is; its text is checked to be nothing but such a name, so a
  Reference can't carry a binding of its own.
  """
  _TEXT = re.compile(r"@[A-Za-z_][\w./]*(\(\))?|%[A-Za-z_][\w./]*")

  def __init__(self, text: str):
    if not self._TEXT.fullmatch(text):
      raise ValueError(f"{text!r} is not a gin reference (@name, @name() or %NAME)")
    self.text = text

  @property
  def is_macro(self) -> bool:
    return self.text.startswith("%")

  @property
  def evaluate(self) -> bool:
    """True for @name(): gin calls the configurable and passes what it returns."""
    return self.text.endswith("()")

  @property
  def name(self) -> str:
    """The configurable or macro named, without @, % or ()."""
    return self.text.lstrip("@%").removesuffix("()")

  def __repr__(self):
    return self.text

  def __eq__(self, other):
    return isinstance(other, Reference) and other.text == self.text

  def __hash__(self):
    return hash(self.text)


def gin_literal(value) -> str:
  """`value` as gin text: the one way gptneo writes a value into a gin file or binding.

  gin's own formatting (repr, as gin.operative_config_str writes), so a string can never end
  its binding and start another: a newline in it is written `\\n`. Lists, tuples and dicts are
  written item by item; a Reference as its text.

  Args:
    value: None, a bool, int, finite float or str, a Reference, or a list, tuple or dict of
      those.

  Raises:
    TypeError: anything else (a caller's bug: check a value before writing it).
  """
  if isinstance(value, Reference):
    return value.text
  if type(value) is list:
    return "[" + ", ".join(map(gin_literal, value)) + "]"
  if type(value) is tuple:
    return "(" + ", ".join(map(gin_literal, value)) + ("," if len(value) == 1 else "") + ")"
  if type(value) is dict:
    return "{" + ", ".join(f"{gin_literal(k)}: {gin_literal(v)}" for k, v in value.items()) + "}"
  if value is None or type(value) in (bool, int, str) or (
      type(value) is float and math.isfinite(value)):
    return repr(value)
  raise TypeError(f"gin_literal cannot write {value!r} ({type(value).__name__}); check the "
                  f"value before writing it")


class TextDelegate(config_parser.ParserDelegate):
  """Makes gin's parser hand references and macros back as References, importing nothing."""

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return Reference(f"@{scoped_configurable_name}{'()' if evaluate else ''}")

  def macro(self, macro_name):
    return Reference(f"%{macro_name}")


def statements(text: str, name: str) -> list:
  """gin's parse of `text`, evaluating only literals: nothing is imported, bound or called.

  Args:
    text: gin text.
    name: what its statements' locations (and gin's errors) call it.

  Returns:
    gin's statements (config_parser.BindingStatement, ImportStatement, ...); references and
    macros in their values are References.

  Raises:
    SyntaxError, tokenize.TokenError: as gin's parser does.
  """
  source = io.StringIO(text)
  source.name = name
  return list(config_parser.ConfigParser(source, TextDelegate()))


def syntax_message(error: Exception) -> str:
  """What a SyntaxError (or tokenize.TokenError) of gin's parser says is wrong, on one line:
  gin puts its detail last ("Failed to parse token 'four'")."""
  text = error.msg if isinstance(error, SyntaxError) else str(error.args[0])
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


# --- What a binding names -----------------------------------------------------------------

def _full_name(configurable):
  return f"{configurable.module}.{configurable.name}"


def _parameters(configurable):
  """The names a binding of `configurable` may set; None if it takes **kwargs (any)."""
  fn = configurable.wrapped
  if inspect.isclass(fn):  # its own __init__ (gin wraps it), or object's, which takes nothing
    fn = next(k.__dict__["__init__"] for k in fn.__mro__ if "__init__" in k.__dict__)
  fn = inspect.unwrap(fn)
  if fn is object.__init__:
    return []
  signature = inspect.signature(fn)
  if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
    return None
  return [name for name in signature.parameters if name != "self"
          and name not in (configurable.denylist or ())]


def binding_problem(selector: str, parameter: str):
  """Why `selector.parameter` binds nothing of gptneo, with what to write instead.

  Args:
    selector: a configurable as a binding names it, e.g. GPT or scope/gpt.GPT.
    parameter: the parameter bound, e.g. n_embd.

  Returns:
    None if it is a parameter of one of our configurables, else e.g. "GPT has no parameter
    'n_embdd'; did you mean GPT.n_embd?".
  """
  configurable = _our_configurable(selector.rsplit("/", 1)[-1])
  if configurable is None:
    names = sorted({c.name for c in registered()})
    return f"{selector!r} is no configurable of gptneo; " + _fix(
        selector.rsplit(".", 1)[-1], names, "", "see docs/config_reference.md")
  return _parameter_problem(configurable, parameter)


def _parameter_problem(configurable, parameter):
  parameters = _parameters(configurable)
  if parameters is None or parameter in parameters:
    return None
  return f"{configurable.name} has no parameter {parameter!r}; " + _fix(
      parameter, parameters, configurable.name + ".", f"its parameters: {', '.join(parameters)}")


def _fix(name, choices, prefix, otherwise):
  """"did you mean <the closest choice>?", else `otherwise`."""
  close = difflib.get_close_matches(name, choices, n=1)
  return f"did you mean {prefix}{close[0]}?" if close else otherwise


# --- What a model dir's config may set (docs/model_dirs.md) -------------------------------

# Full names of configurables; a name ending in "." stands for every one of that module.
# Applied: every configurable of the model (its shape, and what decoding needs to rebuild it).
MODEL = ("gptneo.model.",)
# Ignored: how the model was trained. Our runs write these into every operative config (the
# mesh, TPU or cluster they ran on, the optimizer, and what of mesh-tensorflow the optimizer
# and the TPU mesh call); a model dir never chooses them for another program, whose own gin
# files and flags set its runtime.
TRAINING_ONLY = ("gptneo.train.train", "gptneo.mesh.mesh", "gptneo.optim.optimizers.",
                 "gptneo.loggers.",
                 "mesh_tensorflow.optimize.", "mesh_tensorflow.layers.unit_scaling_convention",
                 "mesh_tensorflow.simd_mesh_impl.SimdMeshImpl")
_GPT, _TRAIN = "gptneo.model.gpt.GPT", "gptneo.train.train"
# The only places a model dir's config may hold a reference, what each may name (a full name,
# or every configurable of a module: a name ending in ".") and whether as @name(), as our
# configs write them; None is allowed there too.
REFERENCE_KNOBS = {
    (_GPT, "activation"): (("gptneo.model.ops.",), False),
    (_GPT, "feed_forward"): (("gptneo.model.feedforward.",), False),
    (_GPT, "positions"): (("gptneo.model.positions.",), True),
    (_GPT, "moe"): (("gptneo.model.moe.MoE",), True),
    (_TRAIN, "model"): ((_GPT,), True),
    (_TRAIN, "mesh"): (("gptneo.mesh.mesh",), True),
    (_TRAIN, "optimizer"): (("gptneo.optim.optimizers.Adam",
                             "gptneo.optim.optimizers.Adafactor"), True),
}
_MODEL_DIR_RULE = ("it may set only the model (the configurables of gptneo.model) and macros "
                   "of literals: see docs/model_dirs.md")


def _references(value):
  """The References (@ and %) anywhere in a parsed value."""
  if isinstance(value, Reference):
    return [value]
  if isinstance(value, dict):
    value = [*value.keys(), *value.values()]
  if isinstance(value, (list, tuple)):
    return [ref for item in value for ref in _references(item)]
  return []


def _binding_text(statement):
  scope = f"{statement.scope}/" if statement.scope else ""
  parameter = f".{statement.arg_name}" if statement.arg_name else ""
  return f"{scope}{statement.selector}{parameter} = {gin_literal(statement.value)}"


def _bad_reference(knob, value):
  """Why the references in `value`, bound to `knob` (a configurable's full name and
  parameter; None for a macro), are refused; None if they are not."""
  references = [ref for ref in _references(value) if not ref.is_macro]
  if not references:
    return None
  allowed = REFERENCE_KNOBS.get(knob)
  if allowed is None or references != [value]:
    return f"{references[0]}: only {', '.join(_knob_names())} may name a configurable"
  names, evaluate = allowed
  configurable = _our_configurable(value.name.rsplit("/", 1)[-1])
  if value.evaluate != evaluate or not _named_in(configurable, names):
    choices = " or ".join(f"a configurable of {name[:-1]}" if name.endswith(".")
                          else "@" + name.rsplit(".", 1)[-1] for name in names)
    return (f"{value} is no choice of {knob[0].rsplit('.', 1)[-1]}.{knob[1]}, which takes "
            f"{choices}, written @name{'()' if evaluate else ''}")
  return None


def _named_in(configurable, names):
  """Whether `configurable` (or None) is one of `names` (as MODEL and TRAINING_ONLY)."""
  full = _full_name(configurable) if configurable else None
  return bool(full) and any(full == name or (name.endswith(".") and full.startswith(name))
                            for name in names)


def _knob_names():
  return [f"{configurable.rsplit('.', 1)[-1]}.{parameter}"
          for configurable, parameter in REFERENCE_KNOBS]


def _model_dir_role(statement):
  """How a model dir's config treats one parsed statement: ("apply" | "ignore", None, None),
  or (None, the statement as gin text, why it is refused or None)."""
  if isinstance(statement, config_parser.ImportStatement):
    return None, f"`{statement.format()}`", None
  if isinstance(statement, config_parser.IncludeStatement):
    return None, f"`include {statement.filename!r}`", None
  configurable = _our_configurable(statement.selector, ours=False)
  role = ("apply" if _named_in(configurable, MODEL)
          else "ignore" if _named_in(configurable, TRAINING_ONLY) else None)
  if isinstance(statement, config_parser.BlockDeclaration):
    return (role, None, None) if role else (None, f"a block of {statement.selector!r}", None)
  try:
    shown = f"`{_binding_text(statement)}`"
  except TypeError:  # a literal gin's parser reads that our configs never write (bytes, ...)
    return None, f"the value {statement.value!r} of {statement.selector}", None
  if not statement.arg_name:  # a macro: literals and macros only
    bad = _bad_reference(None, statement.value)
    return ("apply", None, None) if not bad else (None, shown, bad)
  if role is None:
    return None, shown, f"{statement.selector} is not part of the model"
  bad = (_parameter_problem(configurable, statement.arg_name)
         or _bad_reference((_full_name(configurable), statement.arg_name), statement.value))
  return (role, None, None) if not bad else (None, shown, bad)


def check_model_config(path: str, text: str) -> str:
  """The gin text to apply of a model dir's config; a one-line refusal of anything else.

  A model dir can come from anyone (a gs:// bucket, a download), so its config is data: it
  may set the model's shape (every configurable of gptneo.model) and macros of literals
  (DATASET_DIR: the dataset bin/eval scores by default). References may only name what our
  own configs name at each knob (REFERENCE_KNOBS): GPT.activation = @gelu, GPT.positions =
  @RotaryPositions(), ... How the model was trained (TRAINING_ONLY: train, mesh, the optimizer,
  the schedule and the mesh-tensorflow they call), which every operative config we write
  holds, is checked the same way and then ignored: a model dir never chooses a program's
  devices, TPU, cluster or servers.
  Anything else (an `import` or `include`, any other configurable, a reference elsewhere) is
  refused. The config is read with gin's parser, which evaluates only literals; what is
  applied is written anew from the values read (gin_literal), so gin never sees the rest.

  Args:
    path: the config's file name, for the messages.
    text: its contents.

  Returns:
    The bindings to apply, as gin text.

  Raises:
    UserError: "<path>:<line>: <what> is not allowed in a model dir's config; ...".
  """
  try:
    parsed = statements(text, path)
  except SyntaxError as error:
    raise UserError(f"{path}:{error.lineno}: gin syntax error: {syntax_message(error)}") from None
  except tokenize.TokenError as error:
    raise UserError(f"{path}: gin syntax error: {syntax_message(error)}") from None
  applied = []
  for statement in parsed:
    role, refused, why = _model_dir_role(statement)
    if refused:
      raise UserError(f"{path}:{statement.location.line_num}: {refused} is not allowed in a "
                      f"model dir's config{f' ({why})' if why else ''}; {_MODEL_DIR_RULE}")
    if role == "apply" and isinstance(statement, config_parser.BindingStatement):
      applied.append(_binding_text(statement) + "\n")
  return "".join(applied)


def _read_model_config(path):
  """A model dir's config, checked, as a file-like object gin parses (named for its errors):
  the bindings check_model_config applies, and nothing else."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError as error:
    raise UserError(f"can't read {path}: {error.strerror}") from None
  source = io.StringIO(check_model_config(path, text))
  source.name = path
  return source


def _check_gin_params(gin_params):
  """A binding gin can't parse is named with the --gin_param that holds it."""
  for param in gin_params:
    try:
      statements(param, "--gin_param")
    except (SyntaxError, tokenize.TokenError) as error:
      raise UserError(f"--gin_param={param!r}: gin syntax error: {syntax_message(error)}"
                      ) from None


def parse(gin_files, gin_params, model_config=None):
  """Parses gin files and bindings; binds only what is registered (gptneo.configurables).

  Args:
    gin_files: file names or paths, looked up in the working directory, then in `gin/`, e.g.
      ["tiny.gin"] or ["gin/tiny.gin"] (from any folder); an `include` in them is looked up
      in `gin/`, then in the working directory.
    gin_params: bindings, e.g. ["gpt.n_layer = 2"].
    model_config: a model dir's operative_config.gin, parsed before gin_files: only what
      check_model_config applies of it (the model; see docs/model_dirs.md).

  Raises:
    UserError: a file is missing, a model config holds what a model dir may not set, a
      --gin_param is not gin, or a binding names an unknown configurable or parameter.
  """
  gin.clear_config()
  gin_dir = shipped_gin_dir()
  source = _read_model_config(model_config) if model_config else None
  paths = [_find_gin_file(name, gin_dir) for name in gin_files]
  _check_gin_params(gin_params)
  try:
    with _include_lookup(gin_dir):
      if source:
        gin.parse_config(source)
      gin.parse_config_files_and_bindings(paths, gin_params, finalize_config=True)
  except (ValueError, KeyError, IOError, SyntaxError) as error:
    message = _gin_error_message(error)
    if "gin.REQUIRED" in message:
      message += " Set it with --gin_param."
    raise UserError(f"gin: {message}") from None


def parse_flags():
  parse(FLAGS.gin_file, FLAGS.gin_param)


def write_run_files(model_dir):
  """Writes the operative config and the full command line into `model_dir`.

  Args:
    model_dir: a local folder (a gs:// model dir's mirror): neither file is written through a
      link (model_dir.open_file).
  """
  # Here, not at the top: gin_utils stays a leaf that every binary imports first.
  from gptneo import model_dir as model_dir_lib  # pylint: disable=g-import-not-at-top
  os.makedirs(model_dir, exist_ok=True)
  with model_dir_lib.open_file(os.path.join(model_dir, "operative_config.gin"), "w") as f:
    f.write(gin.operative_config_str())
  with model_dir_lib.open_file(os.path.join(model_dir, "command.txt"), "a") as f:
    f.write(" ".join(sys.argv) + "\n")


def graph_mode():
  """Switches this process to TF1 graph mode, as our entry points run: run() and the tests.

  Importing gptneo leaves TensorFlow eager, for the user's own code. Our graphs are built
  inside `with graph.as_default()`, but checkpoints are restored and saved (tf.train.Saver,
  checkpoints.Checkpoints) outside it, which only graph mode allows.
  """
  # pylint: disable-next=g-import-not-at-top  (TensorFlow, its start-up banner silenced)
  from gptneo.quiet_tensorflow import tensorflow
  tensorflow.compat.v1.disable_eager_execution()  # resource variables stay on


BUG_REPORT = ("this is a bug in gptneo, not in your input: please report it with the "
              "traceback above and the command line")


def run(main, graph=True):
  """Like `absl.app.run`: bad input (UserError) ends in one line on stderr and exit code 2;
  a run that diverged (Diverged) in one line and EXIT_DIVERGED; anything else is a bug, shown
  with its traceback, a line saying so, and exit code 1.

  Args:
    main: the program's main(argv).
    graph: switch TensorFlow to graph mode first (graph_mode); False for a program that may
      end without loading TensorFlow (gptneo-sweep --status), which switches it itself.
  """
  def guarded_main(argv):
    program = os.path.basename(sys.argv[0])
    try:
      return main(argv)
    except UserError as error:
      print(f"{program}: error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
      sys.exit(2)
    except Diverged as error:  # not a bug, not bad input: the run's own outcome
      print(f"{program}: diverged: {str(error).strip().splitlines()[0]}", file=sys.stderr)
      sys.exit(EXIT_DIVERGED)
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
      print(f"{program}: internal error: {BUG_REPORT}", file=sys.stderr)
      sys.exit(1)
  if graph:
    graph_mode()
  app.run(guarded_main, flags_parser=command_line.parse)


def check_output(path, flag="--output", overwrite=False, folder=False):
  """Refuses to write the user's `path` where that would lose or can't make anything.

  Args:
    path: the file (or, with folder=True, the folder) a program is about to write.
    flag: the flag that named it, for the message.
    overwrite: whether replacing an existing file (a non-empty folder) was asked for.
    folder: path is a folder to write files into.

  Raises:
    UserError: path is empty, of the other kind, exists without overwrite, or its parent is a
      file.
  """
  if not path:
    raise UserError(f"{flag} must name a {'folder' if folder else 'file'}")
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(f"{flag}={path}: {parent} is a file, not a folder; choose another path")
  if os.path.isdir(path) != folder and os.path.exists(path):
    kind = "a folder; name a file" if not folder else "a file; name a folder"
    raise UserError(f"{flag}={path} is {kind}")
  occupied = os.path.isdir(path) and os.listdir(path) if folder else os.path.exists(path)
  if occupied and not overwrite:
    raise UserError(f"{flag}={path} exists; pass --overwrite to replace it, or choose another "
                    f"path")
