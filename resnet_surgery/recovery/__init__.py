"""Recovering what an approximate rewrite loses: evaluation, BatchNorm re-estimation, refits, block reconstruction, fine-tuning."""
