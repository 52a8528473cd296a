"""Training the backbone: fine-tuning, Wang et al.'s baselines, saliency."""
