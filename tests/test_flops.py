"""FLOPs per token against hand counts; the peak from train.peak_flops, a GPU's name or this
CPU's measured (and cached) matmul rate."""
import json
import os
import subprocess
import sys

import pytest

from gptneo import flops
from gptneo import gin_utils
from gptneo import train as train_lib
from gptneo import mesh as mesh_lib
from gptneo import runtime
from gptneo.compat import tf
from gptneo.errors import UserError
from gptneo.model import feedforward
from gptneo.model import gpt
from gptneo.model import moe as moe_lib
from tests.conftest import TINY_TEST_BINDINGS

E, HEADS, T, V, W = 64, 4, 128, 1000, 32  # embd, heads, n_ctx, vocab, window
HEAD_OUT = 2 * E * V  # the output projection, per token
QKVO = 2 * 4 * E * E  # q, k, v and out projections
MLP = 2 * 2 * E * 4 * E  # fc and proj


def _model(layers, **kwargs):
  return gpt.GPT(n_layer=len(layers), n_embd=E, n_head=HEADS, n_ctx=T, n_vocab=V,
                 attention_layers=layers, window_size=W, **kwargs)


@pytest.mark.parametrize("layers, attention_flops", [
    (["global", "global"], 2 * (2 * 2 * E * T)),  # q.k and p.v over all n_ctx keys
    (["local", "local"], 2 * (2 * 2 * E * 2 * W)),  # its block and the one before
    (["global", "local", "linear"],
     2 * 2 * E * T + 2 * 2 * E * 2 * W + 2 * 2 * E * (E // HEADS)),
])
def test_flops_per_token_match_a_hand_count(layers, attention_flops):
  model = _model(layers)
  forward = HEAD_OUT + len(layers) * (QKVO + MLP) + attention_flops
  assert flops.forward_flops_per_token(model) == forward
  assert flops.training_flops_per_token(model) == 3 * forward


def test_a_window_as_long_as_the_context_counts_as_global():
  assert (flops.forward_flops_per_token(gpt.GPT(n_layer=1, n_embd=E, n_head=HEADS, n_ctx=W,
                                                n_vocab=V, attention_layers=["local"],
                                                window_size=W))
          == 2 * E * V + QKVO + MLP + 2 * 2 * E * W)


def test_glu_and_moe_count_the_matrices_a_token_goes_through():
  glu = _model(["global"], feed_forward=feedforward.glu)
  assert flops.forward_flops_per_token(glu) == HEAD_OUT + QKVO + MLP * 3 // 2 + 4 * E * T
  moe = _model(["global", "global"], moe=moe_lib.MoE(layers=[1], num_experts=4))
  dense = HEAD_OUT + 2 * (QKVO + 4 * E * T) + MLP
  assert flops.forward_flops_per_token(moe) == dense + 2 * E * 4 + MLP  # router + one expert


def _spec(devices, implementation="placement"):
  return mesh_lib.MeshSpec([("x", len(devices))], [], devices, implementation)


def test_peak_from_the_setting_a_device_name_or_none():
  assert flops.peak_flops(_spec(["/gpu:0", "/gpu:1"]), 1e12) == 2e12
  assert flops.peak_flops(_spec(["/cpu:0"] * 8, "simd"), "tpu_v4") == 8 * 275e12
  assert flops.peak_flops(_spec(["/cpu:0"] * 8, "simd")) is None  # a TPU must be named
  with pytest.raises(UserError, match=r"train.peak_flops = 'tpu_v9' is no device we know"):
    flops.peak_flops(_spec(["/cpu:0"]), "tpu_v9")
  with pytest.raises(UserError, match="must be a positive FLOP/s per device"):
    flops.peak_flops(_spec(["/cpu:0"]), -1.0)


def test_a_cpu_mesh_measures_this_machine_a_few_times_and_keeps_the_best(tmp_path, monkeypatch):
  measured = iter([4e10, 6e10, 5e10])  # a neighbour was busy during the first measurement
  monkeypatch.setattr(flops, "measure_matmul_rate", lambda precision: next(measured))
  spec = _spec(["/cpu:0", "/cpu:1"])  # two CPU devices share the same cores: one machine
  rates = [flops.peak_flops(spec, cache_dir=str(tmp_path)) for _ in range(5)]
  assert rates == [4e10, 6e10, 6e10, 6e10, 6e10]  # three measurements, then the cache only
  cached = json.loads((tmp_path / flops.RATE_CACHE).read_text())
  assert cached == {flops.machine_key(): {"rate": 6e10, "samples": flops.MEASUREMENTS}}


def test_a_bfloat16_run_measures_and_caches_the_bfloat16_rate_apart(tmp_path, monkeypatch):
  monkeypatch.setattr(flops, "measure_matmul_rate",
                      lambda precision: {"float32": 5e10, "bfloat16": 9e10}[precision])
  spec = _spec(["/cpu:0"])
  assert flops.peak_flops(spec, cache_dir=str(tmp_path), precision="bfloat16") == 9e10
  assert flops.peak_flops(spec, cache_dir=str(tmp_path)) == 5e10
  cached = json.loads((tmp_path / flops.RATE_CACHE).read_text())
  assert cached == {flops.machine_key(): {"rate": 5e10, "samples": 1},
                    f"{flops.machine_key()}|bfloat16": {"rate": 9e10, "samples": 1}}


@pytest.mark.parametrize("flags, native", [("fpu avx2 fma", False),
                                            ("avx2 avx512f avx512_bf16", True),
                                            ("avx2 amx_bf16 amx_tile", True)])
def test_which_cpus_multiply_bfloat16_in_hardware(tmp_path, flags, native):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
  assert runtime.cpu_has_native_bfloat16(str(cpuinfo)) is native
  assert runtime.cpu_has_native_bfloat16(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_the_measured_matmul_rate_is_plausible(precision):
  rate = flops.measure_matmul_rate(n=256, seconds=0.2, precision=precision)
  assert 1e8 < rate < 1e14  # between a slow core and far more than any CPU


def test_utilization():
  assert flops.utilization(1000.0, 6e6, 1.2e10) == {"tflops": 0.006, "mfu": 0.5}
  assert flops.utilization(1000.0, 6e6, None) == {"tflops": 0.006}


def _train(model_dir, dataset, *bindings):
  gin_utils.parse(["tiny.gin"], TINY_TEST_BINDINGS + [
      f"DATASET_DIR = {dataset!r}", "train.train_steps = 3", "train.eval_batches = 0",
      *bindings])
  return train_lib.train(str(model_dir))


def test_every_training_log_line_reports_mfu_and_tflops(tmp_path, small_dataset):
  _train(tmp_path / "run", small_dataset, "train.peak_flops = 2e9")
  per_token = flops.training_flops_per_token(train_lib.settings().model)
  records = [json.loads(line) for line in (tmp_path / "run" / "train_metrics.jsonl").open()]
  assert [r["step"] for r in records] == [1, 2, 3]
  for r in records:
    assert r["tflops"] == pytest.approx(r["tokens_per_sec"] * per_token / 1e12)
    assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * per_token / 2e9)
  tags = {value.tag for path in (tmp_path / "run").glob("events.out.tfevents.*")
          for event in tf.compat.v1.train.summary_iterator(str(path))
          for value in event.summary.value}
  assert {"mfu", "tflops", "tokens_per_sec"} <= tags


def test_a_bfloat16_run_on_cpu_reports_mfu_of_the_bfloat16_rate_and_warns_if_emulated(
    tmp_path, small_dataset, monkeypatch, caplog):
  monkeypatch.setenv("GPTNEO_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(flops, "measure_matmul_rate",
                      lambda precision: {"float32": 5e10, "bfloat16": 9e10}[precision])
  monkeypatch.setattr(runtime, "cpu_has_native_bfloat16", lambda: False)
  _train(tmp_path / "run", small_dataset, 'train.precision = "bfloat16"')
  per_token = flops.training_flops_per_token(train_lib.settings().model)
  for line in (tmp_path / "run" / "train_metrics.jsonl").open():
    record = json.loads(line)
    assert record["mfu"] == pytest.approx(record["tokens_per_sec"] * per_token / 9e10)
  assert "bfloat16 matmuls are emulated" in caplog.text


def test_an_unknown_peak_is_refused_before_anything_is_written(tmp_path, small_dataset):
  with pytest.raises(UserError, match="train.peak_flops = 'tpu_v9' is no device we know"):
    _train(tmp_path / "run", small_dataset, 'train.peak_flops = "tpu_v9"')
  assert not (tmp_path / "run").exists()


def test_a_rate_measured_while_others_load_our_cores_is_not_cached(tmp_path):
  """A sweep's parallel points measured each other's load and kept it: MFU above 100%."""
  busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
          for _ in os.sched_getaffinity(0)]  # they inherit our cores
  try:
    rate = flops.peak_flops(_spec(["/cpu:0"]), cache_dir=str(tmp_path))
  finally:
    for process in busy:
      process.kill()
      process.wait()
  assert rate > 0
  assert not (tmp_path / flops.RATE_CACHE).exists()
