"""Questions about the data: label-efficiency curves, embedding maps.

The constants here are light (no numpy, sklearn or matplotlib) so the command line can offer them as
choices without importing the analyses.
"""

TRAIN_VIEWS = ("orig", "all")  # a curve trains on a drawn cell's original view, or on all its views
