"""Metrics: metrics.jsonl, TensorBoard, W&B and the console (local), Ray custom metrics (ray_metrics)."""
