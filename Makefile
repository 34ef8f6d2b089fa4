# The two commands of the README. Both set up .venv first (idempotent).
.PHONY: setup demo test lint

setup:
	bash scripts/setup.sh

# The main job: GRPO on the built-in tiny model and synthetic task (CPU, a few minutes on 2 cores).
demo: setup
	.venv/bin/fleetrl train examples/grpo_tiny.yaml

# The whole test suite (unit + end-to-end on real Ray, vLLM CPU and DeepSpeed).
test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check .
