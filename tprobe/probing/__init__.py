"""Probes: heads, splits and metrics, the CV engines, probe runs, sweeps and predictions."""
