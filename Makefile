# Two commands do all set-up: `make fit` (train on the embedded synthetic data) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := offline
export OMP_WAIT_POLICY := PASSIVE

.PHONY: install fit test clean

$(STAMP): pyproject.toml constraints.txt
	@# a checkout from before callbacks/ moved to the top level keeps gazeguard/callbacks/__pycache__,
	@# which Python would take for the package gazeguard.callbacks
	@test -f gazeguard/callbacks/__init__.py || rm -rf gazeguard/callbacks
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

fit: $(STAMP)
	$(BIN)/python -m gazeguard.fit $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
