"""Typed feature sources (stores, tables, pixels) and the feature sets heads train on."""
