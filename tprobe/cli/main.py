"""The ``tprobe`` command line: thin click commands over the library's public functions."""

from __future__ import annotations

import logging
import os
import sys

import click

from tprobe._version import __version__
from tprobe.cli import cache, data, probe, science, train
from tprobe.errors import TprobeError


class _Group(click.Group):
    """Turns TprobeError into one line on stderr and exit status 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TprobeError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo(
                "interrupted: finished work is kept (store chunks, training epochs); rerun the same command "
                "to resume (finetune: --resume RUN_DIR)",
                err=True,
            )
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as exc:  # a bug, not bad input: one line, with the way to the traceback
            if "-v" in sys.argv or "--verbose" in sys.argv:
                raise
            click.echo(
                f"error: unexpected {type(exc).__name__}: {exc}; rerun with `tprobe -v ...` for the "
                "traceback and report it",
                err=True,
            )
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tprobe")
@click.option("-v", "--verbose", is_flag=True, help="Log more detail.")
def main(verbose: bool):
    """tprobe: an embedding cache and probe toolkit for microscopy cell images.

    \b
    Typical session on the bundled T-cell sample:
      tprobe preprocess                      # filter, pad and augment; manifest + contact sheet
      tprobe extract --model dinov2-small-reg
      tprobe probe --head logreg             # donor-held-out metrics, plots, run dir
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("tprobe").setLevel(logging.INFO)  # our own progress and notes reach stderr
    # read by transformers / huggingface_hub when a command first imports them (commands that load no
    # model never do: --help, status, report, export start without torch or transformers); retries and
    # advisory warnings are ours to summarise. Set them yourself to see more.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    if "transformers" in sys.modules:  # imported already (tests, a notebook calling main): quiet it now
        transformers = sys.modules["transformers"]
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        import huggingface_hub

        huggingface_hub.utils.logging.set_verbosity_error()


main.add_command(data.preprocess)
main.add_command(data.models)
main.add_command(cache.extract)
main.add_command(cache.status)
main.add_command(cache.export)
main.add_command(probe.probe)
main.add_command(probe.predict)
main.add_command(science.curve)
main.add_command(science.map_)
main.add_command(science.report)
main.add_command(train.finetune)
main.add_command(train.saliency)
main.add_command(train.baseline)

if __name__ == "__main__":  # pragma: no cover
    main()
