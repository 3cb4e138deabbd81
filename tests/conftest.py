"""Shared fixtures: a small prepared dataset and a tiny model config for fast training tests."""
import glob
import os
import pathlib
import pwd
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import uuid

import gin
import pytest

# The one registration point: tests parse gin configs in process, as the binaries do.
import gptneo.configurables  # noqa: F401  pylint: disable=unused-import
from gptneo import gin_utils

gin_utils.graph_mode()  # the tests run our code as the binaries do (gin_utils.run)

REPO = pathlib.Path(__file__).resolve().parent.parent
N_CTX = 32
VOCAB = 512

# A model small enough that a test trains it in seconds on 2 cores.
TINY_TEST_BINDINGS = [
    "GPT.n_layer = 2", "GPT.n_embd = 32", "GPT.n_head = 4", f"GPT.n_ctx = {N_CTX}",
    f"GPT.n_vocab = {VOCAB}", "train.batch_size = 8", "train.log_every_n_steps = 1",
    "train.eval_batches = 2", "learning_rate_schedule.learning_rate = 3e-3",
    "learning_rate_schedule.warmup_steps = 5", "train.eval_every_n_steps = 0",  # tiny.gin: 200
]


def stdlib_files(count):
  """`count` real source files of the running Python, deterministic."""
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  names = ["argparse.py", "ast.py", "calendar.py", "csv.py", "difflib.py", "fractions.py",
           "heapq.py", "json/decoder.py", "string.py", "textwrap.py", "shlex.py", "queue.py"]
  return [str(stdlib / n) for n in names[:count]]


@pytest.fixture(autouse=True)
def no_gin_bindings_leak():
  """A test's gin bindings must not reach the configurables another test calls directly."""
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
  """A dataset of 12 stdlib files: BPE vocab 512, n_ctx 32."""
  from gptneo.data import prepare  # pylint: disable=g-import-not-at-top
  folder = tmp_path_factory.mktemp("data") / "small"
  prepare.prepare_dataset(stdlib_files(12), str(folder), n_ctx=N_CTX, vocab_size=VOCAB,
                          validation_fraction=0.2)
  return str(folder)


def run_binary(name, *args, check=False, pythonpath=(), timeout=None):
  """Runs bin/<name> as a user would; returns the CompletedProcess (text).

  Args:
    name: the program in bin/.
    *args: its command line.
    check: raise AssertionError, with its stderr, if it fails.
    pythonpath: folders to import from after the repo.
    timeout: seconds after which a program that hangs is killed (subprocess.TimeoutExpired).
  """
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, [REPO, *pythonpath])))
  result = subprocess.run([sys.executable, str(REPO / "bin" / name), *args], env=env,
                          capture_output=True, text=True, check=False, cwd=REPO,
                          timeout=timeout)
  if check and result.returncode:
    raise AssertionError(f"bin/{name} failed:\n{result.stderr[-3000:]}")
  return result


class GcsEmulator:
  """A running Cloud Storage emulator with one empty bucket, as the `gcs` fixture gives it.

  Attributes:
    host: the emulator's URL, also in $STORAGE_EMULATOR_HOST (inherited by run_binary).
    bucket: a `google.cloud.storage.Bucket` of this test's own, for arranging and checking.
    downloads: object names in the order the emulator served their bytes.
  """

  def __init__(self, host, bucket, downloads):
    self.host, self.bucket, self.downloads = host, bucket, downloads

  def uri(self, prefix):
    return f"gs://{self.bucket.name}/{prefix}"

  def objects(self, prefix):
    """{name below prefix/: (generation, bytes)} of what the bucket holds there."""
    counted = len(self.downloads)
    found = {blob.name[len(prefix) + 1:]: (blob.generation, blob.download_as_bytes())
             for blob in self.bucket.client.list_blobs(self.bucket, prefix=prefix + "/")}
    del self.downloads[counted:]  # Checking is not downloading.
    return found


@pytest.fixture
def gcs(monkeypatch, tmp_path):
  """A Cloud Storage emulator on a free loopback port, its bucket empty; stopped after the test.

  The google-cloud-storage client (in process, and in binaries run_binary starts) talks to it
  through $STORAGE_EMULATOR_HOST, anonymously; $GPTNEO_CACHE_DIR points into tmp_path.
  """
  from gcp_storage_emulator.server import create_server  # pylint: disable=g-import-not-at-top
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  server = create_server("127.0.0.1", 0, in_memory=True)
  server.start()  # returns once the server is listening
  downloads = _count_downloads(server)
  host = f"http://127.0.0.1:{server._api._httpd.server_address[1]}"
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", host)
  monkeypatch.setenv("GPTNEO_CACHE_DIR", str(tmp_path / "cache"))
  try:
    bucket = storage.Client(project=None).create_bucket(f"test-{uuid.uuid4().hex[:12]}")
    yield GcsEmulator(host, bucket, downloads)
  finally:
    server.stop()


def _count_downloads(server):
  """Records every object whose bytes the emulator reads (it serves media via get_file)."""
  from gcp_storage_emulator import storage  # pylint: disable=g-import-not-at-top
  backend = server._storage
  serve, downloads = backend.get_file, []

  def counted(bucket_name, file_name, *args, **kwargs):
    if bucket_name != storage.RESUMABLE_DIR:  # Its own state for resumable uploads.
      downloads.append(file_name)
    return serve(bucket_name, file_name, *args, **kwargs)

  backend.get_file = counted
  return downloads


def _postgres_bin():
  """The folder of PostgreSQL's initdb and pg_ctl (Debian keeps them off PATH), or None."""
  found = shutil.which("initdb")
  folders = [os.path.dirname(found)] if found else []
  folders += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
  return next((f for f in folders if os.path.isfile(os.path.join(f, "pg_ctl"))), None)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def postgres():
  """A PostgreSQL server of this test's own on a loopback port, stopped after the test;
  yields its URL (user gptneo, no password, database postgres).

  The server comes from the distribution's packages (.ci/run installs them). It refuses to run
  as root, so as root its folder belongs to the `postgres` user the package creates (or
  `nobody`) and initdb and pg_ctl run as that user.
  """
  bindir = _postgres_bin()
  if bindir is None:
    pytest.skip("PostgreSQL's server (initdb, pg_ctl) is not installed: apt-get install "
                "postgresql (.ci/run does)")
  folder = tempfile.mkdtemp(prefix="gptneo-postgres-")  # not tmp_path: root's, 0700
  prefix = []
  if os.geteuid() == 0:
    name = next(n for n in ("postgres", "nobody") if _user_exists(n))
    os.chown(folder, pwd.getpwnam(name).pw_uid, pwd.getpwnam(name).pw_gid)
    prefix = ["runuser", "-u", name, "--"]
  data, port = os.path.join(folder, "data"), _free_port()

  def pg(program, *args):
    subprocess.run([*prefix, os.path.join(bindir, program), *args], check=True,
                   capture_output=True, cwd=folder)

  try:
    pg("initdb", "-D", data, "-U", "gptneo", "--auth=trust", "-E", "UTF8")
    pg("pg_ctl", "-D", data, "-l", os.path.join(folder, "server.log"), "-w", "-o",
       f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")  # -w: until it serves
    yield f"postgresql://gptneo@127.0.0.1:{port}/postgres"
  finally:
    if os.path.isfile(os.path.join(data, "postmaster.pid")):
      pg("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
    shutil.rmtree(folder, ignore_errors=True)


def _user_exists(name):
  try:
    pwd.getpwnam(name)
    return True
  except KeyError:
    return False


# GPT-Neo's architecture (unscaled attention, global + local layers) at test size, with a
# window long enough for a prompt plus 32 greedy tokens: HF GPT-Neo can compute it exactly.
NEO_N_CTX = 64
NEO_TEST_BINDINGS = [
    "GPT.n_layer = 2", "GPT.n_embd = 32", "GPT.n_head = 4", f"GPT.n_ctx = {NEO_N_CTX}",
    f"GPT.n_vocab = {VOCAB}", "GPT.scale_attention = False",
    'GPT.attention_layers = [[["global", "local"], 1]]', "GPT.window_size = 16",
    "train.batch_size = 8", "train.log_every_n_steps = 10", "train.eval_batches = 0",
    "learning_rate_schedule.learning_rate = 3e-3", "learning_rate_schedule.warmup_steps = 5",
]


@pytest.fixture(scope="session")
def neo_model_dir(tmp_path_factory):
  """A GPT-Neo-shaped model trained 30 steps on a 64-token dataset; returns its model dir."""
  from gptneo import train  # pylint: disable=g-import-not-at-top
  from gptneo.data import prepare  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("neo")
  prepare.prepare_dataset(stdlib_files(8), str(root / "data"), n_ctx=NEO_N_CTX,
                          vocab_size=VOCAB, validation_fraction=0.25)
  gin_utils.parse(["tiny.gin"], NEO_TEST_BINDINGS + [
      f'DATASET_DIR = "{root / "data"}"', "train.train_steps = 30"])
  train.train(str(root / "run"))
  gin.clear_config()
  return str(root / "run")
