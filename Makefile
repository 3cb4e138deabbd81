# `make demo` trains a tiny GPT on Python's stdlib and samples from it; `make test` runs the tests.
# Every target installs what it needs into .venv first; the programs are .venv/bin/gptneo-*
# (bin/* from the checkout run the same programs, in .venv).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# PROFILE picks the TensorFlow build: cpu (TF 2.21 and the dev tools: the default), tpu
# (tensorflow-tpu 2.20 + libtpu, for a TPU VM: docs/tpu.md) or gpu (TF 2.21 with CUDA:
# docs/gpu.md). The venv remembers its profile, so later targets keep it unless told otherwise;
# another profile makes the venv anew (two TensorFlow builds can't share one).
PROFILE ?= $(shell cat $(VENV)/.profile 2>/dev/null || echo cpu)
REQUIREMENTS_cpu := requirements-dev.txt
REQUIREMENTS_tpu := requirements-tpu.txt
REQUIREMENTS_gpu := requirements-gpu.txt
REQUIREMENTS := $(REQUIREMENTS_$(PROFILE))
$(if $(REQUIREMENTS),,$(error PROFILE=$(PROFILE) is unknown; use cpu, tpu or gpu))
# What `make test` runs: cpu the whole suite; tpu and gpu its core, chosen to stay short (CI
# runs it under the TPU profile): training, resume, evaluation (periodic and bin/eval),
# sampling, a split layout, the shipped layout files, the TPU graphs and checks, the TF shims.
CORE_TESTS := tests/test_tpu.py tests/test_compat.py \
	tests/test_train.py::test_loss_falls_and_validation_loss_is_reported \
	tests/test_train.py::test_periodic_evaluation_after_a_resume_equals_an_uninterrupted_run \
	tests/test_train.py::test_validation_is_one_number_periodic_end_of_run_and_bin_eval \
	tests/test_train.py::test_sample_prints_decoded_text \
	'tests/test_layouts.py::test_split_equals_single_device[4 data x model]' \
	tests/test_layouts.py::test_shipped_cpu_layout_file_is_a_tested_case \
	tests/test_layouts.py::test_accelerator_layout_fits_its_slice_and_gpt3_xl
TESTS_cpu := tests
TESTS_tpu := $(CORE_TESTS)
TESTS_gpu := $(CORE_TESTS)
# Off a TPU VM, libtpu asks the cloud's metadata server which TPU it is on, retrying for
# minutes: the tests never use a TPU, so they skip that question.
TEST_ENV_tpu := TPU_SKIP_MDS_QUERY=1
DATA := data/stdlib
RUN := runs/tiny

.PHONY: install demo data train sample test faults lint bench clean sweep sweep-report

install: $(VENV)/.installed-$(PROFILE)

$(VENV)/.installed-$(PROFILE): $(wildcard requirements*.txt) setup.py
	@if [ -f $(VENV)/.profile ] && [ "$$(cat $(VENV)/.profile)" != $(PROFILE) ]; then \
	  echo "$(VENV) holds the $$(cat $(VENV)/.profile) profile: making it anew for $(PROFILE)"; \
	  rm -rf $(VENV); fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r $(REQUIREMENTS)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	echo $(PROFILE) > $(VENV)/.profile
	touch $@

data: $(DATA)/dataset.json

$(DATA)/dataset.json: | install
	$(BIN)/gptneo-prepare-data --input=stdlib --output_dir=$(DATA) --n_ctx=256 --vocab_size=4096

train: install data
	$(BIN)/gptneo-train --gin_file=tiny.gin --model_dir=$(RUN)

sample: install
	$(BIN)/gptneo-sample --model_dir=$(RUN) --prompt="def main(" --gin_param="sample.max_new_tokens = 120"

demo: train sample

# A sweep file of gin/sweeps/ (make sweep SWEEP=gin/sweeps/tiny_lr.gin), run PARALLEL points at
# once into ROOT; running it again resumes. make sweep-report ROOT=... rewrites the report.
SWEEP ?= gin/sweeps/tiny_lr.gin
ROOT ?= runs/sweeps/$(basename $(notdir $(SWEEP)))
PARALLEL ?= $(shell [ "$$(nproc)" -ge 2 ] && echo 2 || echo 1)

sweep: install data
	$(BIN)/gptneo-sweep --sweep=$(SWEEP) --root=$(ROOT) --parallel=$(PARALLEL)

sweep-report: install
	$(BIN)/gptneo-sweep --report --root=$(ROOT)

test: install
	$(TEST_ENV_$(PROFILE)) $(BIN)/python -m pytest -q $(TESTS_$(PROFILE))

# The fault suite with a storm of 20 kills (CI runs 5); prints kills, checkpoints verified,
# leftovers and the largest loss difference from an uninterrupted run.
faults: install
	FAULT_KILLS=20 $(BIN)/python -m pytest -q -s tests/test_faults.py

lint: install
	$(BIN)/ruff check gptneo bin tests bench

bench: install
	$(BIN)/python -m pip install -q -r requirements-bench.txt
	$(BIN)/python bench/train_throughput.py --precision=float32,bfloat16
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/inputs.py
	$(BIN)/python bench/prepare.py
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) build *.egg-info
