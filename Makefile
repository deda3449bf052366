# Set-up is two commands: `make run` serves the shipped checkpoint, `make test` runs the tests.
# Both create and fill .venv on first use; installs are idempotent (a stamp file tracks pyproject.toml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ddsnet-installed
TORCH_PIN := torch==2.13.0
CHECKPOINT ?= checkpoints/ddsnet-color.safetensors
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run test lint smoke clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The pin takes the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_PIN)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[train,serve,dev]" "$(TORCH_PIN)"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	@test -f "$(CHECKPOINT)" || { echo "error: $(CHECKPOINT) is missing; see README 'Training' to make one" >&2; exit 1; }
	$(VENV)/bin/ddsnet serve --host $(HOST) --port $(PORT) --checkpoint "$(CHECKPOINT)"

# pytest exits 5 when it collects no tests; say so plainly instead of failing with a bare status.
test: $(STAMP)
	@$(PY) -m pytest -q $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$status

# The image and the compose stack under podman (docker/smoke.sh): needs root, podman, runc and debootstrap, and
# takes minutes, so it is not part of `make test`. podman-compose comes from PyPI into .venv.
smoke: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check "podman-compose>=1.0.6"
	PATH="$(abspath $(VENV))/bin:$$PATH" docker/smoke.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check model training service tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
