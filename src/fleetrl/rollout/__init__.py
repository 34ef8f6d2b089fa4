"""fleetrl rollout service: vLLM generation workers (``worker``), the Ray fleet that
load-balances them (``fleet``), the in-engine weight receiver (``weight_receiver``) and
their config (``config``). Imports nothing heavy: vLLM loads when a worker is built."""
