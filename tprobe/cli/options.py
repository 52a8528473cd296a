"""Options shared by several commands, and the rule that an option which does not apply is refused."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from tprobe.errors import TprobeError


# ---- shared options -----------------------------------------------------------------------
def data_options(f):
    """--data plus every preprocessing parameter, turned into (dataset, config) for the command."""
    from tprobe.data.preprocess import PreprocessConfig

    d = PreprocessConfig()
    opts = [
        click.option(
            "--data",
            type=click.Path(path_type=Path),
            default=None,
            help="Image folder, CSV/Parquet manifest, or a `tprobe preprocess --out` folder "
            "[default: bundled T-cell sample].",
        ),
        click.option(
            "--canvas",
            type=int,
            default=d.canvas,
            show_default=True,
            help="Square canvas side in px, a multiple of the model's patch size; left at the default "
            "it is rounded up to the patch size (144 for /16 models).",
        ),
        click.option(
            "--fit",
            type=click.Choice(["pad", "resize", "fill"]),
            default=d.fit,
            show_default=True,
            help="pad: drop cells larger than the canvas; resize: shrink those; fill: scale every cell to fill it.",
        ),
        click.option(
            "--views",
            type=click.Choice(["six", "dihedral8", "orig"]),
            default=d.views,
            show_default=True,
            help="Augmented views per cell: six (orig, r90/180/270, fliph, flipv), all eight, or orig only.",
        ),
        click.option(
            "--entropy-min",
            type=float,
            default=d.entropy_min,
            show_default=True,
            help="Drop below this entropy (bits).",
        ),
        click.option(
            "--entropy-dim",
            type=float,
            default=d.entropy_dim,
            show_default=True,
            help="Drop below this entropy when also dimmer than --intensity-dim.",
        ),
        click.option(
            "--intensity-dim",
            type=float,
            default=d.intensity_dim,
            show_default=True,
            help="Summed-intensity dim limit.",
        ),
        click.option(
            "--binary-threshold",
            type=float,
            default=d.binary_threshold,
            show_default=True,
            help="Pixel threshold for the cell mask (8-bit scale).",
        ),
        click.option(
            "--min-area",
            "min_component_area",
            type=int,
            default=d.min_component_area,
            show_default=True,
            help="Ignore mask components smaller than this (px) when counting cells.",
        ),
        click.option(
            "--max-value",
            default=None,
            help="Top of the camera range for 16-bit input (e.g. 4095) [default: 65535]; with several "
            "channels one value for all or NAME=VALUE,... for each.",
        ),
        click.option(
            "--max-pixels",
            type=click.IntRange(min=1),
            default=d.max_pixels,
            show_default=True,
            help="Skip (with a line) an image whose header declares more values (width x height x "
            "planes), before it is decoded.",
        ),
        click.option(
            "--channels",
            default=None,
            metavar="NAME,NAME,...",
            help="Name the planes of multi-channel images in file order (TIFF (C,H,W) or (H,W,C), or the "
            "channel names of --channel-files) [default: one grey channel].",
        ),
        click.option(
            "--channel-mode",
            type=click.Choice(["grey", "rgb", "per-channel"]),
            default="grey",
            show_default=True,
            help="grey: one channel; rgb: three channels as R,G,B; per-channel: each channel embedded "
            "on its own, pooled per channel and concatenated.",
        ),
        click.option(
            "--use",
            default=None,
            metavar="NAME,...",
            help="The channels the model sees, in order [default: the first (grey), the first three "
            "(rgb), all (per-channel)].",
        ),
        click.option(
            "--segment-channel",
            default=None,
            metavar="NAME",
            help="The channel the dim and multi-cell filters measure [default: the first used].",
        ),
        click.option(
            "--channel-files",
            default=None,
            metavar="PATTERN",
            help="One file per channel: the file-name stem pattern, e.g. '{cell}_{channel}' for "
            "cell7_nadh.tif, cell7_fad.tif.",
        ),
        click.option(
            "--z",
            type=click.IntRange(min=0),
            default=None,
            help="The Z plane of TIFFs with a Z axis (OME-TIFF T,C,Z,Y,X); needed when they have several.",
        ),
        click.option(
            "--t",
            type=click.IntRange(min=0),
            default=None,
            help="The time point of TIFFs with a T axis; needed when they have several.",
        ),
    ]

    @functools.wraps(f)
    def wrapper(*args, data, **kw):
        keys = (
            "canvas",
            "fit",
            "views",
            "entropy_min",
            "entropy_dim",
            "intensity_dim",
            "binary_threshold",
            "min_component_area",
            "channel_mode",
            "segment_channel",
            "channel_files",
            "max_pixels",
            "z",
            "t",
        )
        raw_channels, raw_use = kw.pop("channels"), kw.pop("use")  # an empty name (a,,b) is refused below
        channels = tuple(c.strip() for c in raw_channels.split(",")) if raw_channels else ()
        use = tuple(c.strip() for c in raw_use.split(",")) if raw_use else ()
        max_value = _parse_max_value(kw.pop("max_value"), channels)
        config = PreprocessConfig(
            **{k: kw.pop(k) for k in keys}, channels=channels, use=use, max_value=max_value
        )
        return f(*args, data=data, prep=config, **kw)

    for opt in reversed(opts):
        wrapper = opt(wrapper)
    return wrapper


def _parse_max_value(value: str | None, channels: tuple[str, ...]):
    """``4095`` (every channel) or ``nadh=4095,fad=65535`` (one per channel, in --channels order)."""
    if value is None:
        return None
    try:
        if "=" not in value:
            return float(value)
        items = [(k.strip(), float(v)) for k, v in (item.split("=") for item in value.split(","))]
    except ValueError:
        raise TprobeError(f"--max-value {value!r}: give a number, or NAME=NUMBER for each channel") from None
    pairs = dict(items)
    twice = next((k for i, (k, _) in enumerate(items) if k in dict(items[:i])), None)
    if twice is not None:
        raise TprobeError(
            f"--max-value {value!r} names {twice} twice; give NAME=NUMBER once for each of "
            f"--channels {','.join(channels) or '(none given)'}"
        )
    if set(pairs) != set(channels):
        raise TprobeError(
            f"--max-value {value!r} names {','.join(pairs)}; give NAME=NUMBER for each of "
            f"--channels {','.join(channels) or '(none given)'}"
        )
    return tuple(pairs[c] for c in channels)


def parse_shard(value: str) -> tuple[int, int]:
    try:
        i, k = (int(x) for x in value.split("/"))
        assert 0 <= i < k
    except (ValueError, AssertionError):
        raise click.BadParameter(f"{value!r}: use i/N with 0 <= i < N, e.g. 0/4") from None
    return i, k


CACHE_OPTION = click.option(
    "--cache",
    type=click.Path(path_type=Path),
    default=Path("cache"),
    show_default=True,
    help="Cache folder of manifests and feature stores.",
)


OFFLINE_OPTION = click.option("--offline", is_flag=True, help="Never contact the hub; use the HF cache only.")


NORMALIZE_OPTION = click.option(
    "--normalize",
    type=click.Choice(["none", "standard", "donor-center"]),
    default="standard",
    show_default=True,
    help="none: heads see the features as given; standard: standardised inside each training fold; "
    "donor-center: each donor centred on its own cells' mean first (label-free; transductive for the "
    "held-out donor), then standard.",
)


DEVICE_OPTION = click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps.",
)


def split_options(f):
    """--split and --test-donor, shared by probe, finetune and baseline."""
    f = click.option(
        "--test-donor", default=None, help="Donor held out with --split test-donor (e.g. 4 or donor_4)."
    )(f)
    return click.option(
        "--split",
        type=click.Choice(["leave-one-donor-out", "group-kfold", "test-donor"]),
        default="leave-one-donor-out",
        show_default=True,
        help="Outer split; donors never straddle it.",
    )(f)


# ---- options that do not apply: refused in one line, never silently ignored -------------------------
PREP_PARAMS = (
    "canvas",
    "fit",
    "views",
    "entropy_min",
    "entropy_dim",
    "intensity_dim",
    "binary_threshold",
    "min_component_area",
    "max_value",
    "max_pixels",
    "channels",
    "channel_mode",
    "use",
    "segment_channel",
    "channel_files",
)


def given(name: str) -> bool:
    """Whether the user gave option ``name`` (not left at its default)."""
    ctx = click.get_current_context()
    return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)


def refuse_unused(rules) -> None:
    """``rules``: (option name, applies, why). The first option given that does not apply is refused in
    one line naming it and why (e.g. ``--pool does not apply with --features (...)``); drop it to run."""
    ctx = click.get_current_context()
    for name, applies, why in rules:
        if not applies and given(name):
            opt = next(p for p in ctx.command.params if p.name == name)
            raise TprobeError(f"{max(opt.opts, key=len)} does not apply {why}; drop it")


def prep_rules(applies: bool, why: str):
    """Every preprocessing option: used only when images are read (``applies``)."""
    return [(name, applies, why) for name in PREP_PARAMS]


def split_rules(split: str, with_folds: bool = False):
    rules = [("test_donor", split == "test-donor", f"with --split {split} (add --split test-donor)")]
    if with_folds:
        rules.append(("folds", split == "group-kfold", f"with --split {split} (add --split group-kfold)"))
    return rules


TABLE_PARAMS = ("id_column", "exclude", "keep_columns", "all_table_rows")


def run_option(command: str):
    return click.option(
        "--run",
        "run_dir",
        required=True,
        type=click.Path(path_type=Path, exists=True),
        help=f"A run directory written by `tprobe {command}`"
        + (" (or a sweep folder: its best run is used)." if command == "probe" else "."),
    )


def source_rules(stores, models, features, pixels, data):
    """Options of `curve` and `map` that only some feature sources use."""
    reads_images = data is not None or bool(models or features or pixels)
    return [
        ("revision", bool(models), "without --model"),
        ("pool", bool(stores or models), "without --store/--model (it pools a store's tokens)"),
        *[(n, bool(features), "without --features TABLE") for n in TABLE_PARAMS],
        *prep_rules(
            reads_images,
            "with --store sources and no --data (a store holds its own preprocessing; "
            "add --data to check it against those images)",
        ),
    ]


def source_options(f):
    """Feature sources shared by `curve` and `map`: several stores, tables and the pixel baseline."""
    opts = [
        click.option(
            "--store",
            "stores",
            multiple=True,
            type=click.Path(path_type=Path, exists=True),
            help="A feature store (repeatable).",
        ),
        click.option("--model", "models", multiple=True, help="Use this model's cached store (repeatable)."),
        click.option("--revision", default=None, help="Hub revision of --model."),
        click.option("--pool", default="cls", show_default=True, help="Pooling of the store tokens."),
        click.option(
            "--features",
            multiple=True,
            type=click.Path(path_type=Path),
            help="A feature table, CSV/Parquet, one row per image (repeatable).",
        ),
        click.option(
            "--id-column", default=None, help="Column of --features holding file names or image ids."
        ),
        click.option(
            "--drop-columns",
            "--exclude",
            "exclude",
            multiple=True,
            help="Column of --features to leave out, beyond the identifier rule (repeatable).",
        ),
        click.option(
            "--keep-columns",
            multiple=True,
            help="Column of --features the identifier/position rule drops, to use anyway (repeatable).",
        ),
        click.option(
            "--all-table-rows",
            is_flag=True,
            help="Score every --features row naming an image, also images the quality filters removed.",
        ),
        click.option("--pixels", is_flag=True, help="Add the raw-pixel baseline (64 px canvas) as a source."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


# ---- SLURM: an array job's options, and this command's own options for its tasks to rerun ---------
# ---- extract on SLURM: one array job; task i runs this same command with --shard i/N --------------
SLURM_PARAMS = (
    "executor",
    "shards",
    "partition",
    "time",
    "gpus_per_task",
    "cpus_per_task",
    "mem",
    "account",
    "max_running",
    "sbatch_option",
    "slurm_dir",
    "poll",
)


def slurm_options(f, *, sweep: bool = False):
    executor_help = (
        "slurm: one array task per pool x head, watched; then the sweep summary."
        if sweep
        else "slurm: submit one array job of --shards tasks, watch it, return when sealed."
    )
    opts = [
        click.option(
            "--executor",
            type=click.Choice(["local", "slurm"]),
            default="local",
            show_default=True,
            help=executor_help,
        ),
        *(
            []
            if sweep
            else [
                click.option(
                    "--shards", type=int, default=None, help="[slurm] Array tasks (e.g. total GPUs)."
                )
            ]
        ),
        click.option("--partition", default=None, help="[slurm] Partition."),
        click.option("--time", default=None, help="[slurm] Time limit per task, e.g. 2:00:00."),
        click.option(
            "--gpus-per-task", type=int, default=None, help="[slurm] GPUs per task (1 = one shard per GPU)."
        ),
        click.option(
            "--cpus-per-task", type=int, default=None, help="[slurm] CPUs per task (DataLoader workers)."
        ),
        click.option("--mem", default=None, help="[slurm] Memory per task, e.g. 32G."),
        click.option("--account", default=None, help="[slurm] Account to charge."),
        click.option(
            "--max-running", type=int, default=None, help="[slurm] At most this many tasks at once."
        ),
        click.option(
            "--sbatch-option",
            multiple=True,
            help="[slurm] Any other sbatch option, e.g. --qos=high (repeatable).",
        ),
        click.option(
            "--slurm-dir",
            type=click.Path(path_type=Path),
            default=Path("slurm"),
            show_default=True,
            help="[slurm] Folder for the sbatch script and task logs.",
        ),
        click.option(
            "--poll",
            type=float,
            default=10.0,
            show_default=True,
            help="[slurm] Seconds between progress checks.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def forward_args(ctx) -> list[str]:
    """This command's own options, minus the SLURM ones and --shard, for the array tasks to rerun."""
    args = []
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if not isinstance(p, click.Option) or p.name in (*SLURM_PARAMS, "shard") or value is None:
            continue
        opt = max(p.opts, key=len)
        if p.is_flag:
            args += [opt] if value else []
            continue
        if isinstance(value, Path) or (p.name == "model" and Path(value).expanduser().is_dir()):
            value = Path(value).expanduser().absolute()
        args += [opt, str(value)]
    return args


def token_names(text: str) -> tuple[str, ...]:
    """``--tokens cls,registers`` -> ("cls", "registers")."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def sbatch_options(slurm):
    """The sbatch options; a value that cannot go into a script is refused here, before any work."""
    from tprobe.cluster.slurm import SlurmOptions

    return SlurmOptions(
        partition=slurm["partition"],
        time=slurm["time"],
        gpus_per_task=slurm["gpus_per_task"],
        cpus_per_task=slurm["cpus_per_task"],
        mem=slurm["mem"],
        account=slurm["account"],
        max_running=slurm["max_running"],
        extra=tuple(slurm["sbatch_option"]),
        slurm_dir=slurm["slurm_dir"],
    )
