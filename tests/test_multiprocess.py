"""One mesh over two processes on loopback: the single-process losses, and clear failures."""
import os
import signal
import socket
import subprocess
import sys

import numpy as np

from tests.conftest import REPO, TINY_TEST_BINDINGS
from tests.test_errors import assert_one_line_error
from tests.test_train import logged_losses, train_in_process

STEPS = 4
MESH = ['mesh.mesh_shape = "x:2"', 'mesh.layout = "batch:x"']


def free_ports(count):
  """Ports the OS just handed out (bound, then released for the servers to take)."""
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("localhost", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def task_command(model_dir, dataset, ports, task, steps=STEPS, timeout=20.0):
  cluster = {"worker": [f"localhost:{port}" for port in ports]}
  params = TINY_TEST_BINDINGS + MESH + [
      f'DATASET_DIR = "{dataset}"', f"train.train_steps = {steps}", f"mesh.cluster = {cluster}",
      f"mesh.operation_timeout = {timeout}", "train.steps_per_checkpoint = 1000"]
  return [sys.executable, str(REPO / "bin" / "train"), "--gin_file=tiny.gin",
          f"--model_dir={model_dir}", f"--task_index={task}"] + [f"--gin_param={p}"
                                                                  for p in params]


def start(command, **kwargs):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.Popen(command, env=env, text=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, **kwargs)


def finish(process, timeout=120):
  _, stderr = process.communicate(timeout=timeout)
  return subprocess.CompletedProcess(process.args, process.returncode, "", stderr)


def test_two_processes_give_the_single_process_losses(tmp_path, small_dataset):
  ports = free_ports(2)
  worker = start(task_command(tmp_path / "task1", small_dataset, ports, 1))
  chief = finish(start(task_command(tmp_path / "task0", small_dataset, ports, 0)))
  assert chief.returncode == 0, chief.stderr[-3000:]
  assert finish(worker).returncode == 0  # released by task 0, not left serving
  train_in_process(tmp_path / "single", small_dataset, STEPS, *MESH)
  split, single = logged_losses(tmp_path / "task0"), logged_losses(tmp_path / "single")
  assert sorted(split) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([split[s] for s in sorted(split)],
                             [single[s] for s in sorted(single)], rtol=0, atol=1e-5)
  assert not (tmp_path / "task1" / "checkpoint").exists()  # only task 0 writes


def test_task_0_without_its_peer_stops_with_a_clear_error(tmp_path, small_dataset):
  result = finish(start(task_command(tmp_path, small_dataset, free_ports(2), 0, timeout=3)))
  assert_one_line_error(result, "train", "task 1 of mesh.cluster", "did not come up within 3s",
                        "--task_index=1")


def test_a_task_without_task_0_stops_with_a_clear_error(tmp_path, small_dataset):
  result = finish(start(task_command(tmp_path, small_dataset, free_ports(2), 1, timeout=3)))
  assert_one_line_error(result, "train", "task 0 at localhost:", "unreachable for 3s")


def test_losing_a_peer_mid_training_stops_task_0(tmp_path, small_dataset):
  ports = free_ports(2)
  worker = start(task_command(tmp_path / "task1", small_dataset, ports, 1, steps=100000))
  chief = start(task_command(tmp_path / "task0", small_dataset, ports, 0, steps=100000,
                             timeout=10))
  lines = []
  for line in chief.stderr:  # blocks on task 0's own log: no sleeping
    lines.append(line)
    if "step 1/" in line:
      worker.send_signal(signal.SIGKILL)
      break
  worker.wait()
  rest = finish(chief, timeout=60)
  stderr = "".join(lines) + rest.stderr
  # TF's gRPC master may log (C++, at ERROR) its failed clean-up of the dead task's graph
  # before our line; that logging can't be silenced once TF is loaded. Ours is one line, last.
  assert chief.returncode == 2 and "Traceback" not in stderr, stderr[-2000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("train: error: task 0 lost a peer of mesh.cluster ("), last
  assert "restart every task" in last and stderr.count("train: error:") == 1, stderr[-2000:]
