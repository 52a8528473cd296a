"""Training the backbone: fine-tuning, Wang et al.'s baselines, saliency.

The names below are plain constants (no torch): the command line builds its choices from them.
"""

from tprobe.errors import TprobeError

BASELINES = ("frequency", "pixel-logreg", "pixel-mlp", "lenet", "inception-frozen", "inception-finetuned")
ALL = BASELINES[:4]  # what ``--name all`` runs: the Inception ones download weights, name them explicitly
INCEPTION = ("inception-frozen", "inception-finetuned")
TRAINED = ("lenet", "inception-finetuned")  # the baselines trained for epochs by the fine-tuning loop
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # training precision: auto = fp16 autocast on GPU, fp32 on CPU


def baseline_names(name: str) -> list[str]:
    """The baselines ``name`` stands for: itself, or ``all`` -> :data:`ALL`; else one line naming them."""
    names = list(ALL) if name == "all" else [name]
    for n in names:
        if n not in BASELINES:
            raise TprobeError(f"--name {n!r} is not one of {', '.join(BASELINES)}, all")
    return names
