# The two set-up commands of the README: `make demo` and `make test`. Each creates
# .venv on first use (torch from this machine's disk or PyPI) and installs distilsd into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# The tests run torch on one thread each (tests/conftest.py), so two pytest-xdist workers keep
# two cores busy: the suite took 24.4 min in one process (PYTEST_WORKERS=0) and 16.3 min on two
# workers (2-core AMD EPYC, 2026-12-02).
# One worker per logical CPU (at most 4); files, not single tests, are spread over them, so a
# module's fixtures are built once.
PYTEST_WORKERS ?= logical --maxprocesses 4

.PHONY: demo test lint install shapes-model

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/distilsd generate "a red circle" -o outputs/demo

test: install
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests scripts

# Train the built-in Shapes model from scratch and distill its students, everything in
# runs/shapes/, then copy them into the package (docs/shapes.md: wall times per run;
# 7-9 h on a 2-core CPU, and 1 h more for the LCM student distilled from the shipped pair).
# Resumable: rerun a step with `--resume latest` appended if interrupted.
shapes-model: install
	$(BIN)/distilsd shapes make-data -o runs/shapes/data --count 60000 --seed 0
	$(BIN)/distilsd shapes init -o runs/shapes/init
	$(BIN)/distilsd train -c shapes-vae
	$(BIN)/distilsd shapes train-text -m runs/shapes/vae --data runs/shapes/data -o runs/shapes/text
	$(BIN)/distilsd train -c shapes-teacher
	$(BIN)/distilsd train -c shapes-teacher-ln
	$(BIN)/distilsd train -c shapes-vae-decoder
	$(BIN)/distilsd distill -c shapes-tiny-kd
	$(BIN)/distilsd train -c shapes-tiny-task
	$(BIN)/python scripts/ship_shapes_model.py --teacher runs/shapes/teacher-ln --student runs/shapes/tiny-kd --vae runs/shapes/vae-decoder
	$(BIN)/distilsd distill -c shapes-tiny-lcm
	$(BIN)/python scripts/ship_shapes_lcm.py --run runs/shapes/tiny-lcm
