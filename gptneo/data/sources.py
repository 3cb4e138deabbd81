"""The inputs of bin/prepare_data: which files, in which format, and their records, streamed.

A source is one input file with a format, detected by its name:

  *.jsonl, *.jsonl.gz, *.jsonl.zst   one JSON object per line, the text at `text_field`
  *.parquet                          one row per document, the text in column `text_field`
  *.tfrecords, *.tfrecord            GPT-Neo's tokenized records (data/create_tfrecords.py):
                                     int64 feature `text`, documents ended by EOS
  anything else                      UTF-8 text: the whole file is one document, or
                                     several with a `document_separator`

A folder stands for every such file below it (hidden entries and binary files skipped), so
the Pile's layout (a folder of `*.jsonl.zst` shards) is one input. `records(source, ...)`
yields a source's records in file order without holding the file: each a `Record` with the
text (a tfrecord's: its token ids, an int array), the JSON object (or Parquet row) for meta
filters, and the byte offset reached, for the progress bar. Errors name the file and the
line (or row, or record).
"""
import codecs
import collections
import dataclasses
import glob
import gzip
import io
import json
import os
import re
import sysconfig

import numpy as np

from gptneo.errors import UserError

STDLIB_SPEC = "stdlib"
BLANK_LINES = "blank_lines"  # The document_separator that splits at empty lines.
# At most this much train text (from the inputs' starts) trains the BPE; here, beside the
# other defaults bin/prepare_data shows before it loads TensorFlow.
TOKENIZER_SAMPLE_BYTES = 256_000_000
_BLANK_LINES_PATTERN = re.compile(r"\n(?:[ \t\r]*\n)+")
_SKIPPED_STDLIB_DIRS = ("site-packages", "dist-packages")  # Third-party code, not stdlib.
_CHUNK_BYTES = 1 << 20
_ROWS_PER_BATCH = 1024
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIX = ".parquet"
TFRECORD_SUFFIXES = (".tfrecords", ".tfrecord")
TFRECORD_FEATURE = "text"  # GPT-Neo's create_tfrecords.py: int64 token ids


@dataclasses.dataclass(frozen=True)
class Source:
  path: str
  format: str  # "text", "jsonl", "parquet" or "tfrecord"


@dataclasses.dataclass(frozen=True)
class Reading:
  """How records are read from the sources.

  Args:
    text_field: JSONL key or Parquet column holding a document's text; dots name a nested
      field ("meta.body").
    document_separator: None (a text file is one document), a literal that separates the
      documents of a text file ("<|endoftext|>"; "\\n" and "\\t" escapes allowed), or
      "blank_lines" (split at one or more empty lines).
    skip_bad_lines: skip (and count) malformed JSONL lines and Parquet rows without text,
      instead of stopping at the first.
  """
  text_field: str = "text"
  document_separator: str = None
  skip_bad_lines: bool = False


Record = collections.namedtuple("Record", "text fields offset")  # text None: a bad line.


def format_of(path):
  """'jsonl', 'parquet', 'tfrecord' or 'text', by the file's name."""
  if path.endswith(JSONL_SUFFIXES):
    return "jsonl"
  if path.endswith(TFRECORD_SUFFIXES):
    return "tfrecord"
  return "parquet" if path.endswith(PARQUET_SUFFIX) else "text"


# --------------------------------------------------------------------------- resolving


def resolve(specs):
  """Expands input specs into the sources they name.

  Args:
    specs: iterable of specs, each a file, a folder (every JSONL, Parquet and UTF-8 text
      file below it, hidden entries and binary files skipped), a glob pattern, or 'stdlib'
      (the running Python's standard library `.py` files, without site-packages).

  Returns:
    Sorted list of unique `Source`s.
  """
  if isinstance(specs, str):
    specs = [specs]
  paths = set()
  for spec in specs:
    matched = _resolve_spec(str(spec))
    if not matched:
      raise UserError(f"input '{spec}' matched no files; pass an existing file, folder, "
                      f"glob or '{STDLIB_SPEC}'")
    paths.update(matched)
  if not paths:
    raise UserError("no inputs given; pass an existing file, folder, glob "
                    f"or '{STDLIB_SPEC}'")
  return [Source(path, format_of(path)) for path in sorted(paths)]


def _resolve_spec(spec):
  """The files one spec names, raising if a named text file is not text."""
  if spec == STDLIB_SPEC:
    return _stdlib_files()
  if os.path.isfile(spec):
    if format_of(spec) == "text" and not is_utf8_text(spec):
      raise UserError(f"input '{spec}' is not UTF-8 text; pass text, JSONL "
                      f"({', '.join(JSONL_SUFFIXES)}) or {PARQUET_SUFFIX} files")
    return [os.path.normpath(spec)]
  if os.path.isdir(spec):
    return _files_under(spec)
  matched = []
  for path in glob.glob(spec, recursive=True):
    if os.path.isdir(path):
      matched.extend(_files_under(path))
    elif os.path.isfile(path) and _is_usable(path):
      matched.append(os.path.normpath(path))
  return matched


def _stdlib_files():
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = [d for d in subdirs if d not in _SKIPPED_STDLIB_DIRS]
    files.extend(os.path.join(directory, name) for name in names if name.endswith(".py"))
  # A few test modules are deliberately Latin-1 or broken; they are not usable text.
  return [path for path in files if is_utf8_text(path)]


def _files_under(folder):
  files = []
  for directory, subdirs, names in os.walk(folder):
    # Hidden folders (.git, .venv, ...) hold tool state, not corpus text.
    subdirs[:] = [d for d in subdirs if not d.startswith(".")]
    files.extend(os.path.join(directory, name) for name in names if not name.startswith("."))
  return [os.path.normpath(path) for path in files if os.path.isfile(path) and _is_usable(path)]


def _is_usable(path):
  return format_of(path) != "text" or is_utf8_text(path)


def is_utf8_text(path):
  """Whether the file is UTF-8 without NUL bytes (a NUL means a binary format); streamed."""
  decoder = codecs.getincrementaldecoder("utf-8")()
  with open(path, "rb") as f:
    try:
      for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
        if b"\0" in chunk:
          return False
        decoder.decode(chunk)
      decoder.decode(b"", final=True)
    except UnicodeDecodeError:
      return False
  return True


def check(sources, reading):
  """Checks what can be checked before reading: every Parquet file has the text column, every
  tfrecord file's first record the token ids."""
  column = reading.text_field.split(".")[0]
  for source in sources:
    if source.format == "tfrecord":
      for raw in _tfrecord_iterator(source.path):
        _tfrecord_ids(raw, source.path, 1)
        break
    if source.format == "parquet":
      names = _parquet_file(source.path).schema_arrow.names
      if column not in names:
        raise UserError(f"{source.path} has no column '{column}' (columns: "
                        f"{', '.join(names)}); pass --text_field=<the text column>")


# --------------------------------------------------------------------------- reading


def records(source, reading, columns=(), token_ids=None):
  """Yields the source's records in file order (see the module docstring).

  Args:
    source: a `Source`.
    reading: a `Reading`.
    columns: top-level Parquet columns to read besides the text (for meta filters).
    token_ids: (EOS id, vocabulary size) of the tokenizer, for tfrecord sources.
  """
  if source.format == "tfrecord":
    return _tfrecord_records(source.path, *token_ids)
  if source.format == "jsonl":
    return _jsonl_records(source.path, reading)
  if source.format == "parquet":
    return _parquet_records(source.path, reading, columns)
  return _text_records(source.path, reading.document_separator)


def field(fields, dotted):
  """The value at a dotted path ("meta.pile_set_name") of nested dicts, or None."""
  value = fields
  for key in dotted.split("."):
    if not isinstance(value, dict):
      return None
    value = value.get(key)
  return value


def _open_binary(path):
  raw = open(path, "rb")  # pylint: disable=consider-using-with
  if path.endswith(".gz"):
    return raw, gzip.GzipFile(fileobj=raw)
  if path.endswith(".zst"):
    import zstandard  # pylint: disable=import-outside-toplevel
    # The Pile's shards were written with long windows; allow any the format allows.
    decompressor = zstandard.ZstdDecompressor(max_window_size=2**31)
    return raw, decompressor.stream_reader(raw, read_across_frames=True)
  return raw, raw


def _decompression_errors():
  import zstandard  # pylint: disable=import-outside-toplevel
  return (zstandard.ZstdError, gzip.BadGzipFile, EOFError, OSError)


def _jsonl_records(path, reading):
  raw, stream = _open_binary(path)
  with raw, stream:
    lines = io.TextIOWrapper(stream, encoding="utf-8", newline="\n")
    number = 0
    try:
      for number, line in enumerate(lines, start=1):
        if line.strip():
          yield _jsonl_record(line, path, number, reading, raw)
    except UnicodeDecodeError:
      raise UserError(f"{path} line {number + 1} is not UTF-8; "
                      "write JSONL files in UTF-8") from None
    except _decompression_errors() as error:
      raise UserError(f"{path} is damaged after line {number} ({_first_line(error)}); "
                      "replace the file (or leave it out)") from None


def _jsonl_record(line, path, number, reading, raw):
  """A Record of one JSONL line, or a bad-line Record (text None) with skip_bad_lines."""
  text_field = reading.text_field
  fields, problem = None, None
  try:
    fields = json.loads(line)
  except json.JSONDecodeError as error:
    problem = f"is not JSON ({error.msg})"
  if problem is None:
    text = field(fields, text_field)
    if text is None:
      keys = ", ".join(sorted(fields)) if isinstance(fields, dict) else type(fields).__name__
      problem = f'has no "{text_field}" field (has: {keys})'
    elif not isinstance(text, str):
      problem = f'has a "{text_field}" that is a {type(text).__name__}, not a string'
  if problem is None:
    return Record(text, fields, raw.tell())
  if reading.skip_bad_lines:
    return Record(None, None, raw.tell())
  raise UserError(f"{path} line {number} {problem}; pass --text_field=<the text field> "
                  "or --skip_bad_lines to skip such lines")


def _parquet_file(path):
  import pyarrow  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet  # pylint: disable=import-outside-toplevel
  try:
    return pyarrow.parquet.ParquetFile(path)
  except (pyarrow.ArrowException, OSError) as error:
    raise UserError(f"{path} is not a readable Parquet file ({_first_line(error)}); "
                    "replace the file (or leave it out)") from None


def _parquet_records(path, reading, columns):
  parquet = _parquet_file(path)
  text_column = reading.text_field.split(".")[0]
  wanted = sorted({text_column, *columns} & set(parquet.schema_arrow.names))
  size, row = os.path.getsize(path), 0
  total_rows = max(1, parquet.metadata.num_rows)
  for batch in parquet.iter_batches(batch_size=_ROWS_PER_BATCH, columns=wanted):
    for fields in batch.to_pylist():
      row += 1
      yield _parquet_record(fields, path, row, reading, size * row // total_rows)


def _parquet_record(fields, path, row, reading, offset):
  text = field(fields, reading.text_field)
  if isinstance(text, str):
    return Record(text, fields, offset)
  if reading.skip_bad_lines:
    return Record(None, None, offset)
  kind = "no text" if text is None else f"a {type(text).__name__}, not a string,"
  raise UserError(f"{path} row {row} has {kind} in '{reading.text_field}'; pass "
                  "--text_field=<the text column> or --skip_bad_lines to skip such rows")


def _tfrecord_iterator(path):
  """The serialized records of a TFRecord file, streamed; a damaged one is named in one line."""
  from gptneo.compat import tf  # pylint: disable=import-outside-toplevel
  number = 0  # records read whole
  try:
    for raw in tf.compat.v1.io.tf_record_iterator(path):
      number += 1
      yield raw
  except (tf.errors.DataLossError, tf.errors.OutOfRangeError) as error:
    raise UserError(f"{path} is damaged after record {number} ({_first_line(error)}); "
                    "replace the file (or leave it out)") from None


def _tfrecord_ids(raw, path, number):
  """The int64 `text` ids of one serialized tf.train.Example, as an int64 array."""
  from tensorflow.core.example import example_pb2  # pylint: disable=import-outside-toplevel
  from google.protobuf import message  # pylint: disable=import-outside-toplevel
  fix = "pass GPT-Neo's tfrecords (data/create_tfrecords.py), or text, JSONL or Parquet"
  try:
    features = example_pb2.Example.FromString(raw).features.feature
  except message.DecodeError:
    raise UserError(f"{path} record {number} is not a tf.train.Example; {fix}") from None
  feature = features.get(TFRECORD_FEATURE)
  if feature is None or feature.WhichOneof("kind") != "int64_list":
    has = ", ".join(f"{name} ({features[name].WhichOneof('kind')})" for name in sorted(features))
    raise UserError(f"{path} record {number} has no int64 feature '{TFRECORD_FEATURE}' (has: "
                    f"{has or 'nothing'}); {fix}")
  return np.asarray(feature.int64_list.value, np.int64)


def _tfrecord_records(path, eos_id, vocab_size):
  """GPT-Neo's records hold chunks of one token stream of documents each ended by EOS
  (create_tfrecords.py): the documents, their ids without EOS, re-cut at each EOS (a document
  continued in the next file is two)."""
  pieces, offset = [], 0
  for number, raw in enumerate(_tfrecord_iterator(path), start=1):
    ids = _tfrecord_ids(raw, path, number)
    offset += len(raw) + 16  # each record's length, data and two CRCs
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
      bad = int(ids.max() if ids.max() >= vocab_size else ids.min())
      raise UserError(f"{path} record {number} holds the token id {bad}, outside the "
                      f"tokenizer's {vocab_size} ids; pass the --tokenizer the tfrecords were "
                      f"made with")
    start = 0
    for end in np.flatnonzero(ids == eos_id):
      pieces.append(ids[start:end])
      yield Record(np.concatenate(pieces), None, offset)
      pieces, start = [], end + 1
    pieces.append(ids[start:])
  if sum(piece.size for piece in pieces):
    yield Record(np.concatenate(pieces), None, offset)


def _text_records(path, separator):
  """A text file's documents: the whole file, or its pieces between separators."""
  pattern = _separator_pattern(separator)
  decoder = codecs.getincrementaldecoder("utf-8")()
  buffered = ""
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
      buffered += _decode(decoder, chunk, path)
      if pattern is not None:
        documents, buffered = _split_complete(pattern, buffered)
        yield from (Record(text, None, f.tell()) for text in documents)
    buffered += _decode(decoder, b"", path, final=True)
    pieces = [buffered] if pattern is None else pattern.split(buffered)
    yield from (Record(text, None, f.tell()) for text in pieces)


def _separator_pattern(separator):
  if separator is None:
    return None
  if separator == BLANK_LINES:
    return _BLANK_LINES_PATTERN
  literal = separator.replace("\\n", "\n").replace("\\t", "\t")
  return re.compile(re.escape(literal))


def _split_complete(pattern, text):
  """(documents ended by a separator that cannot grow with more text, the rest)."""
  documents, start = [], 0
  for match in pattern.finditer(text):
    if match.end() == len(text):  # more blank lines may follow in the next chunk
      break
    documents.append(text[start:match.start()])
    start = match.end()
  return documents, text[start:]


def _decode(decoder, chunk, path, final=False):
  try:
    return decoder.decode(chunk, final=final)
  except UnicodeDecodeError:
    raise UserError(f"input '{path}' is not UTF-8 text; pass text files only") from None


def _first_line(error):
  return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
