"""Prefect flows over the distill library (thin: parse parameters, call distill, move artifacts)."""
