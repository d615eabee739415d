"""Parsers of flag values that are not one plain type (argparse shows their error messages as they are)."""

from __future__ import annotations

import argparse


def float_or_auto(text: str) -> float | str:
    """A flag value that is a number or ``auto`` (argparse shows the error message as it is)."""
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def bool_or_auto(text: str) -> bool | str:
    """A flag value that is true / false (yes / no, 1 / 0) or ``auto``."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None and text.lower() != "auto":
        raise argparse.ArgumentTypeError(f"expected true, false or auto, got {text!r}")
    return "auto" if value is None else value
