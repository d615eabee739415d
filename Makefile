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
# The demo: a ControlNet on the toy world, sized for a 2-core CPU (README, "The demo").
# STEPS trains it longer: a finished demo continues from its last checkpoint (make demo STEPS=500).
STEPS ?= 250
DEMO_ARGS ?= --condition normal --max_train_samples 1000 --train_batch_size 16 --learning_rate 5e-4 \
	--bank_size 128 --bank_num_inference_steps 10 --convergence_every 20 --convergence_samples 8 \
	--checkpointing_steps 50 --validation_steps 125
# One intra-op thread: the toy models are small, and two threads on a busy 2-core machine ran 2-8x slower.
DEMO_THREADS ?= 1

.PHONY: install demo test lint bench clean-demo

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "installing $(TORCH_PINS) (on x86-64 a CUDA build: about 6.5 GB with its NVIDIA libraries, 2-8 minutes)"
	$(BIN)/python -m pip install --progress-bar on $(TORCH_PINS)
	@echo "installing difftune-control and its dependencies (diffusers, transformers, controlnet-aux, ...)"
	$(BIN)/python -m pip install --progress-bar on -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/difftune train $(DEMO_ARGS) --max_train_steps $(STEPS) \
		--output_dir $(dir $(DEMO_RUN)) --run_name $(notdir $(DEMO_RUN)) --resume_from_checkpoint latest
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/difftune report $(DEMO_RUN)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/difftune export $(DEMO_RUN) --format webui
	@echo "demo done: open $(DEMO_RUN)/report/report.html (the toy-world export in $(DEMO_RUN)/export/ is for the demo only)"
	@echo "train it longer: make demo STEPS=$$(( $(STEPS) * 2 )); other flags: make demo DEMO_ARGS='...' (README)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python scripts/bench_convergence.py

clean-demo:
	rm -rf $(DEMO_RUN)
