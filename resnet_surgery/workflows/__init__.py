"""Workflows that chain the steps: convert -> recover -> export -> time (pipeline) and the variant search (explore)."""
