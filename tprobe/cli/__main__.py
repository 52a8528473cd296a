"""``python -m tprobe.cli``: the same command line as ``tprobe``."""

from tprobe.cli.main import main

if __name__ == "__main__":
    main()
