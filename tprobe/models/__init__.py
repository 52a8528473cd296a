"""Models: one encoder registry (HF DINOv2/DINOv3 ViTs, Inception v3), token layouts."""
