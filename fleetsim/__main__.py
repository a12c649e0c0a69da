"""``python -m fleetsim``: the CLI (also how the coordinator starts pods)."""

from fleetsim.cli import main

if __name__ == "__main__":
    main()
