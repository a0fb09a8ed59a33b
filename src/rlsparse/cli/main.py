"""The ``rlsparse`` command: parse, validate, one library call, print.

User errors (``RlsparseError``) become one line on stderr and exit code 2, without a
traceback. Heavy imports stay inside each command.
"""

from __future__ import annotations

import argparse
import sys

from rlsparse._version import __version__


class Parser(argparse.ArgumentParser):
    """Every parser of the CLI, subcommands included (argparse gives subparsers the parent's class).

    Abbreviations are off: ``--tolerance 1e-5`` must not silently mean ``--tolerances``. An option
    a subcommand does not know is reported with that subcommand's usage, not the top level's.
    """

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and self.prog != _PROG:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


_PROG = "rlsparse"


def make_parser() -> argparse.ArgumentParser:
    from rlsparse.cli import diff_cmd

    parser = Parser(
        prog=_PROG,
        description="Measure, compare, train and ship the sparse subnetworks that RL finetuning updates.")
    parser.add_argument("--version", action="version", version=f"rlsparse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from rlsparse.cli import analysis_cmd, delta_cmd, lab_cmd, predict_cmd, train_cmd

    lab_cmd.add_parser(sub)  # `demo` (the main job) and `lab`
    diff_cmd.add_parser(sub)
    analysis_cmd.add_parsers(sub)
    train_cmd.add_parser(sub)
    delta_cmd.add_parser(sub)
    predict_cmd.add_parser(sub)
    return parser


class _Signalled(KeyboardInterrupt):
    """SIGTERM (what Slurm and `kill` send) or SIGHUP: unwound like Ctrl-C, so every temporary
    output is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum, frame):
    raise _Signalled(signum)


def _install_signal_handlers() -> dict:
    """Unwind SIGTERM and SIGHUP like Ctrl-C; returns the previous handlers."""
    import signal

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        try:
            previous[sig] = signal.signal(sig, _raise_signalled)
        except (TypeError, ValueError, OSError):  # not the main thread, or a platform without it
            pass
    return previous


def _restore_signal_handlers(previous: dict) -> None:
    import signal

    for sig, handler in previous.items():
        signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    command = "rlsparse"
    previous: dict = {}
    try:
        previous = _install_signal_handlers()
        from rlsparse.errors import RlsparseError

        parser = make_parser()
        args = parser.parse_args(argv)
        command = f"rlsparse {args.command}"
        try:
            return int(args.func(args) or 0)
        except RlsparseError as exc:
            from rlsparse.cli.flags import as_flags

            print(f"{command}: error: {as_flags(str(exc))}", file=sys.stderr)
            return exc.exit_code
    except KeyboardInterrupt as exc:
        import signal

        signum = exc.signum if isinstance(exc, _Signalled) else int(signal.SIGINT)
        name = signal.Signals(signum).name
        print(f"{command}: interrupted ({name}); no output was written", file=sys.stderr)
        return 128 + signum
    finally:
        _restore_signal_handlers(previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
