# The two commands of the README, plus the fast loop and lint. Each sets up .venv first (idempotent).
.PHONY: setup demo test test-unit lint constraints

setup:
	bash scripts/setup.sh

# The main job: GRPO on the built-in tiny model and synthetic task (CPU, a few minutes on 2 cores).
demo: setup
	.venv/bin/fleetrl train examples/grpo_tiny.yaml

# The whole test suite (unit + end-to-end on real Ray, vLLM CPU and DeepSpeed).
test: setup
	.venv/bin/python -m pytest -q

# The fast loop: unit tests only (no Ray cluster, no vLLM engine, no DeepSpeed training run).
test-unit: setup
	.venv/bin/python -m pytest -q tests/unit

# ruff, pinned in constraints.txt and the dev extra; rules in pyproject.toml [tool.ruff].
lint: setup
	.venv/bin/ruff check .

# Rewrite constraints.txt from the working .venv (after moving a version on purpose and running `make test`).
constraints:
	{ sed -n '/^#/p' constraints.txt; \
	  .venv/bin/pip freeze --all --exclude-editable | grep -v -e '^#' -e '^-e' -e '^pip==' -e '^fleetrl' \
	    | sed -e 's/^torch==\(.*\)+cpu$$/torch==\1/' | LC_ALL=C sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
