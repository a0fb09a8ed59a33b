"""The ``rlsparse`` command: parse, validate, one library call, print.

User errors (``RlsparseError``) become one line on stderr and exit code 2, without a
traceback. Heavy imports stay inside each command.
"""

from __future__ import annotations

import argparse
import sys

from rlsparse._version import __version__


def make_parser() -> argparse.ArgumentParser:
    from rlsparse.cli import diff_cmd

    parser = argparse.ArgumentParser(
        prog="rlsparse",
        description="Measure, compare, train and ship the sparse subnetworks that RL finetuning updates.")
    parser.add_argument("--version", action="version", version=f"rlsparse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from rlsparse.cli import analysis_cmd, lab_cmd, train_cmd

    lab_cmd.add_parser(sub)  # `demo` (the main job) and `lab`
    diff_cmd.add_parser(sub)
    analysis_cmd.add_parsers(sub)
    train_cmd.add_parser(sub)
    from rlsparse.cli import delta_cmd

    delta_cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rlsparse.errors import RlsparseError

    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RlsparseError as exc:
        from rlsparse.cli.flags import as_flags

        print(f"rlsparse {args.command}: error: {as_flags(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"rlsparse {args.command}: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
