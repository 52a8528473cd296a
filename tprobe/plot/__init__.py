"""Figures shared by every stage."""
