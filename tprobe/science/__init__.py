"""Questions about the data: label-efficiency curves, embedding maps."""
