"""argparse types of the command lines: a bad value is a usage error naming the option (exit 2),
raised while the arguments are parsed, before anything is loaded."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from distill.errors import ConfigError


class Parser(argparse.ArgumentParser):
    """An argument error is one line, `prog: error: ...`, without the usage block above it (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def at_least(low: int) -> Callable[[str], int]:
    """An integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def number_in(low: float, high: float = math.inf) -> Callable[[str], float]:
    """A finite number in [low, high] (argparse's float alone takes nan and inf)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            bound = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f"a finite number >= {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def endpoint_url(text: str) -> str:
    """An S3-compatible endpoint, http(s)://host[:port], with no credentials in it."""
    from distill.locations import check_endpoint_url

    try:
        check_endpoint_url(text, "--endpoint-url")
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--endpoint-url: ")) from None
    return text


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """`--set KEY=VALUE` (repeatable) into `overrides`: config keys overridden as `distill train --set` does
    (see `distill.config.apply_overrides`)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.learning_rate=1e-5 (repeatable)")
