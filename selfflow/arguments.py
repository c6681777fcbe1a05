"""The command line's shared vocabulary: help with defaults, ``--ckpt`` (with the old names as
deprecated aliases for one release), and log lines that never break a progress bar."""
from __future__ import annotations

import argparse
import logging
import sys

CKPT_HELP = "checkpoint folder, run folder (its newest checkpoint) or exported model folder"


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with ``(default: X)`` after every option whose help does not already say it
    (flags that are off by default, and options without a default, say nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is argparse.SUPPRESS or default is False
                or default == [] or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class DeprecatedAlias(argparse.Action):
    """Stores the value; an old option name prints one note (to stderr) naming the new one."""

    def __init__(self, option_strings, dest, deprecated: tuple[str, ...] = (), **kwargs):
        self.deprecated = tuple(deprecated)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.deprecated:
            print(f"selfflow: note: {option_string} is deprecated and will be removed in the next release; "
                  f"use {self.option_strings[0]}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_ckpt_argument(parser: argparse.ArgumentParser, *old_names: str, required: bool = True,
                      help: str = CKPT_HELP, default=None) -> None:
    """``--ckpt`` (``dest="ckpt"``), also accepted under ``old_names`` with a deprecation note."""
    parser.add_argument("--ckpt", *old_names, dest="ckpt", action=DeprecatedAlias, deprecated=old_names,
                        required=required, default=default, help=help)


class TqdmLogHandler(logging.StreamHandler):
    """A console handler whose lines go through ``tqdm.write``: an open progress bar is cleared, the
    line printed on its own, the bar redrawn below (what ``tqdm.contrib.logging`` installs)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:  # noqa: BLE001  (logging's own rule: a failing handler reports, never raises)
            self.handleError(record)


def log_redirect():
    """The context every command runs in: console log handlers write through tqdm
    (``tqdm.contrib.logging.logging_redirect_tqdm`` on the root and ``selfflow`` loggers)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm(loggers=[logging.root, logging.getLogger("selfflow")])
