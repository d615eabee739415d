# Two commands for a fresh machine with nothing but Python 3.10+:
#   make demo   - create .venv if missing, install, train a ControlNet on the toy world, report, export
#   make test   - create .venv if missing, install, run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch: a build whose torchvision (needed by controlnet-aux) imports cleanly beside it.
ARCH := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_PINS ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
endif
DEMO_RUN ?= runs/demo
DEMO_ARGS ?= --condition depth --max_train_steps 200 --train_batch_size 32 --max_train_samples 2000 --bank_size 256 --bank_batch_size 64 --bank_num_inference_steps 10 --convergence_every 25 --checkpointing_steps 100

.PHONY: install demo test lint bench clean-demo

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/difftune train $(DEMO_ARGS) --output_dir $(dir $(DEMO_RUN)) --run_name $(notdir $(DEMO_RUN)) --resume_from_checkpoint latest
	$(BIN)/difftune report $(DEMO_RUN)
	$(BIN)/difftune export $(DEMO_RUN) --format webui
	@echo "demo done: open $(DEMO_RUN)/report/report.html; WebUI file in $(DEMO_RUN)/export/"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python scripts/bench_convergence.py

clean-demo:
	rm -rf $(DEMO_RUN)
