"""Timing on a shared machine: rounds that wait for idle cores and pair up side by side.

This VM is shared: a busy neighbour slows a run and, worse, wrecks torch's OpenMP threads
(they spin-wait at every barrier). Each benchmark therefore times both sides in alternating
rounds, records how much CPU other processes used during each round, waits for them to idle
first, redoes a disturbed round, and reports the median ratio of back-to-back pairs (the VM's
speed drifts by ~10% over minutes, which pairing cancels).
"""
import os
import sysconfig
import time


class CpuMeter:
  """Wall time, this process's CPU time and the whole machine's busy time over a region.

  `foreign` is the CPU (in cores) that other processes used meanwhile: this machine is
  shared, and a busy neighbour both slows a run and, worse, wrecks torch's OpenMP threads
  (they spin-wait at every barrier), so a round with foreign load is not a fair sample.
  """

  @staticmethod
  def _machine_busy():
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

  def __enter__(self):
    self._wall, self._cpu, self._busy = (time.perf_counter(), time.process_time(),
                                         self._machine_busy())
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self._wall
    self.cpu = time.process_time() - self._cpu
    self.foreign = max(0.0, (self._machine_busy() - self._busy - self.cpu) / self.wall)


def wait_for_idle(max_foreign, timeout):
  """Waits (up to `timeout` s) until other processes use < max_foreign cores for 1 s."""
  deadline = time.time() + timeout
  while True:
    with CpuMeter() as meter:
      time.sleep(1.0)
    if meter.foreign < max_foreign or time.time() > deadline:
      return meter.foreign


class Runner:
  """Runs `step()` in timed rounds; keeps each round's tokens/s and foreign load."""

  def __init__(self, step, tokens_per_step, max_foreign, idle_wait, retries):
    self.step, self.tokens_per_step, self.rounds = step, tokens_per_step, []
    self.max_foreign, self.idle_wait, self.retries = max_foreign, idle_wait, retries

  def time_round(self, steps):
    """One round; redone (up to `retries` times) when a neighbour got busy meanwhile."""
    for _ in range(self.retries + 1):
      wait_for_idle(self.max_foreign, self.idle_wait)
      with CpuMeter() as meter:
        for _ in range(steps):
          self.step()
      if meter.foreign < self.max_foreign:
        break
    self.rounds.append((self.tokens_per_step * steps / meter.wall, meter.foreign,
                        meter.cpu / meter.wall))

  def clean(self):
    """The rounds no neighbour disturbed (all rounds if none was spared)."""
    return [r for r in self.rounds if r[1] < self.max_foreign] or self.rounds

  def median(self):
    """(tokens/s, foreign cores) of the median undisturbed round."""
    rounds = sorted(self.clean())
    return rounds[len(rounds) // 2][:2]


def paired_ratio(ours, theirs):
  """Median over rounds of ours/torch, each pair timed back to back (drifts cancel)."""
  ratios = sorted(a[0] / b[0] for a, b in zip(ours.rounds, theirs.rounds, strict=False)
                  if a[1] < ours.max_foreign and b[1] < theirs.max_foreign)
  ratios = ratios or sorted(a[0] / b[0] for a, b in zip(ours.rounds, theirs.rounds, strict=False))
  return ratios[len(ratios) // 2]


# A few large stdlib modules: ~1.3 MB of text, ~400k tokens, far more windows than needed.
BENCH_CORPUS = ("typing.py", "argparse.py", "inspect.py", "subprocess.py", "tarfile.py",
                "pathlib.py", "collections/__init__.py", "logging/__init__.py", "ast.py",
                "datetime.py", "_pydecimal.py", "dataclasses.py", "enum.py", "functools.py")


def bench_corpus_files():
  """The files of BENCH_CORPUS in this Python's stdlib (the benches' training text)."""
  root = sysconfig.get_paths()["stdlib"]
  return [path for path in (os.path.join(root, name) for name in BENCH_CORPUS)
          if os.path.isfile(path)]


def cpu_line(extra_flags=()):
  """The CPU model and the instruction sets TF's and torch's kernels lean on: speed ratios
  move between machines (AVX2-only EPYC vs AVX-512/AMX Intel), so every table says which."""
  with open("/proc/cpuinfo") as f:
    info = f.read().splitlines()
  model = next((line.split(":", 1)[1].strip() for line in info
                if line.startswith("model name")), "unknown CPU")
  flags = set(next((line.split(":", 1)[1].split() for line in info
                    if line.startswith("flags")), []))
  isa = [name for name in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",
                           *extra_flags) if name in flags]
  return f"{model}, {os.cpu_count()} cores, ISA {' '.join(isa) or 'baseline'}"


def add_round_flags(parser):
  """The flags of every bench that times rounds with a Runner: when a round counts as
  undisturbed, how long to wait for idle cores, and how often to redo a disturbed round."""
  parser.add_argument("--max_foreign", type=float, default=0.15,
                      help="a round counts as undisturbed if other processes used fewer cores")
  parser.add_argument("--idle_wait", type=float, default=20,
                      help="seconds to wait, before each round, for other processes to idle")
  parser.add_argument("--retries", type=int, default=2, help="redo a disturbed round this often")
