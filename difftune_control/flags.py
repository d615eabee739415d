"""Command-line flags from the config dataclasses: one ``--<field>`` per field, laid out for reading.

Every field of :data:`~difftune_control.config.SECTIONS` is a flag of the same name whose help is the
field's ``help`` metadata. This module decides only how they read in ``--help``: which group a flag is
listed in (:data:`GROUPS`), its metavar (``PATH``, ``DIR``, ``N``, ``FLOAT``, ``NAME``), and its
default, said once: a help text that states its own default (``Default: toy world 64, SD 512.``,
for the defaults that depend on the base model) keeps it; any other field with a default gets
``Default: <value>.`` appended. A field added to a config section later needs nothing here: it is
listed in its section's group, with a metavar from its type.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, Literal

from difftune_control.config import SECTIONS, _unwrap_optional, field_types

GROUPS: tuple[tuple[str, str], ...] = (
    ("model", "base model and ControlNet"),
    ("data", "data and hints"),
    ("method", "method"),
    ("bank", "memory bank (Diff-Tuning)"),
    ("detector", "sudden-convergence detector"),
    ("train", "optimisation"),
    ("speed", "speed and memory"),
    ("run", "run folder, checkpoints and logging"),
)
"""``(key, title)`` of the help groups, in the order ``--help`` lists them. A field is in the group
named by :data:`FIELD_GROUP`, else in the one of its config section."""

FIELD_GROUP: dict[str, str] = {
    **dict.fromkeys(
        (
            "mixed_precision",
            "gradient_checkpointing",
            "allow_tf32",
            "torch_compile",
            "torch_compile_mode",
            "channels_last",
            "cudnn_benchmark",
            "device",
            "cache_latents",
            "dataloader_num_workers",
        ),
        "speed",
    ),
    **dict.fromkeys(
        (
            "output_dir",
            "run_name",
            "checkpointing_steps",
            "checkpoints_total_limit",
            "resume_from_checkpoint",
            "validation_steps",
            "num_validation_images",
            "logging_steps",
            "report_to",
        ),
        "run",
    ),
}

METAVARS: dict[str, str] = {
    "pretrained_model_name_or_path": "PATH",
    "controlnet_model_name_or_path": "PATH",
    "teacher_controlnet": "PATH",
    "revision": "REV",
    "condition": "NAME",
    "teacher_condition": "NAME",
    "resume_from_checkpoint": "latest|DIR",
    "torch_compile_mode": "MODE",
    "bank_prompts": "FILE",
    "bank_weight": "FLOAT|auto",
    "device": "DEVICE",
    "out": "DIR",
}
"""Metavars that the type alone does not give (see :func:`metavar`)."""

BANK_FIELDS: frozenset[str] = frozenset(
    {
        "pretrained_model_name_or_path",
        "revision",
        "variant",
        "condition",
        "extractor_backend",
        "train_data_dir",
        "dataset_name",
        "dataset_config_name",
        "image_column",
        "conditioning_image_column",
        "caption_column",
        "resolution",
        "center_crop",
        "hint_interpolation",
        "dataset_split",
        "max_train_samples",
        "skip_bad_rows",
        "cache_latents",
        "cache_dir",
        "toy_domain",
        "pretrained_vae_model_name_or_path",
        "method",
        "split",
        "retention",
        "snr_threshold",
        "teacher_controlnet",
        "teacher_condition",
        "teacher_train_data_dir",
        "mixed_precision",
        "device",
    }
)
"""Fields outside the bank section that change what ``difftune bank`` builds (base model, the captions
that prompt it, the extractor of its hints, what distillation records, precision and device). Every
field of the bank section counts too; ``difftune bank --help`` lists only these, and accepts the others
silently, so a training command line works as it is."""


def metavar(name: str, tp: Any) -> str | None:
    """Short metavar of a field: :data:`METAVARS`, else ``DIR`` / ``N`` / ``FLOAT`` / ``NAME`` by name and type.

    ``None`` for choices and switches, which argparse shows as ``{a,b}`` or no value.
    """
    if name in METAVARS:
        return METAVARS[name]
    if tp is bool or typing.get_origin(tp) is Literal:
        return None
    if typing.get_origin(tp) is list:
        tp = typing.get_args(tp)[0]
    if tp is int:
        return "N"
    if tp is float:
        return "FLOAT"
    if name.endswith("_dir"):
        return "DIR"
    if name.endswith("_column"):
        return "COLUMN"
    return "NAME"


def describe_default(value: Any) -> str:
    """A default as a user types it: ``on`` / ``off`` for switches, lists space-separated, ``1e-4``."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(describe_default(v) for v in value)
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-3:
            mantissa, exponent = f"{value:e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:g}"
    return str(value)


def help_with_default(help_text: str, default: Any) -> str:
    """``help_text`` with its default said once: kept when it says ``Default:``, else appended if any."""
    help_text = help_text.strip()
    if "Default:" in help_text or default is None:
        return help_text.replace("%", "%%")
    return f"{help_text} Default: {describe_default(default)}.".replace("%", "%%")


def add_config_arguments(
    parser: argparse.ArgumentParser,
    sections: Collection[str] | Mapping[str, type] = tuple(SECTIONS),
    *,
    overlay: bool = True,
    shown: Collection[str] | None = None,
    choices: Mapping[str, Collection[str]] | None = None,
) -> None:
    """Add one flag per config field (``--<field>``) to ``parser``, in the help groups of :data:`GROUPS`.

    Args:
        parser (`argparse.ArgumentParser`): The (sub)command's parser.
        sections (names of :data:`SECTIONS`, or a mapping ``{name: dataclass}`` for another config):
            Which config sections become flags. A mapping's sections are each listed as one group
            titled ``<name> options``.
        overlay (`bool`, defaults to `True`): ``True`` (for :func:`~difftune_control.config.config_from_args`): flags default to
            ``None``, meaning "keep the dataclass (or saved config) value", and land in
            ``args.<section>.<field>``, so a saved config can be overlaid by only the flags a user
            gave. ``False``: flags carry the dataclass defaults and land in ``args.<field>`` (a command
            with one config section).
        shown (`Collection[str]`, *optional*): Field names to list in ``--help``; the others are
            accepted but not listed. Default: all.
        choices (`Mapping[str, Collection[str]]`, *optional*): The choices of ``str`` fields whose values
            come from a registry (``{"method": RegistryChoices(...)}``); a ``Literal`` field's are its own.
    """
    choices = choices or {}
    if isinstance(sections, Mapping):
        items = list(sections.items())
        groups = {name: parser.add_argument_group(f"{name} options") for name, _ in items}
    else:
        items = [(name, SECTIONS[name]) for name in sections]
        groups = {key: parser.add_argument_group(title) for key, title in GROUPS}
    for section, cls in items:
        hints = field_types(cls)
        for f in dataclasses.fields(cls):
            tp, _ = _unwrap_optional(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            listed = shown is None or f.name in shown
            kw: dict[str, Any] = {
                "default": None if overlay else default,
                "help": help_with_default(f.metadata.get("help", ""), default)
                if listed
                else argparse.SUPPRESS,
            }
            if tp is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif f.name in choices:
                kw["choices"] = choices[f.name]
            elif typing.get_origin(tp) is Literal:
                kw["choices"] = list(typing.get_args(tp))
            elif typing.get_origin(tp) is list:
                kw["nargs"] = "+"
                kw["type"] = typing.get_args(tp)[0]
            else:
                kw["type"] = f.metadata.get("parse", tp)  # e.g. FLOAT|auto
                if "nargs" in f.metadata:  # e.g. --torch_compile alone: its const
                    kw.update(nargs=f.metadata["nargs"], const=f.metadata["const"])
            mv = f.metadata.get("metavar") or (None if f.name in choices else metavar(f.name, tp))
            if mv is not None:
                kw["metavar"] = mv
            group = groups.get(FIELD_GROUP.get(f.name, section), groups.get(section))
            group.add_argument(f"--{f.name}", dest=f"{section}.{f.name}" if overlay else f.name, **kw)


class RegistryChoices(Collection[str]):
    """A flag's choices read from a registry when argparse first needs them, not when the parser is built.

    argparse reads ``choices`` only to check a value given on the command line and to write ``--help``,
    so a command that does not give the flag never loads the registry (the methods registry imports
    torch; the early checks of :mod:`difftune_control.cli` run without it).

    Args:
        names (`Callable[[], list[str]]`): returns the registered names, e.g. ``available_methods``.
    """

    def __init__(self, names: Callable[[], list[str]]) -> None:
        self._names = names

    def __contains__(self, value: object) -> bool:
        return value in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())
