"""Options shared by several subcommands."""

from __future__ import annotations


def add_ray(p) -> None:
    """``--ray [ADDRESS]``: run the streaming work as Ray tasks (the ``distributed`` extra)."""
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster (head address, e.g. host:6379; without one: this machine's "
                        "cluster, started if none runs); workers read the checkpoints from the same paths")
