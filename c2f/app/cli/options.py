"""Flags built from a dataclass's fields (type, default, help, choices and checks in field metadata).

Defaults are left out of the parsed namespace (``argparse.SUPPRESS``), so the namespace holds exactly
the flags given: that is what lets a config file sit between the defaults and the flags, and lets a
resumed run tell a flag given from a default. Each help line still shows its default.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from ...errors import ConfigError
from ..config import base_type, check_value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to every option's help that does not already state its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default:" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return text
        return f"{text} (default: {show(action.default)})"


class Parser(argparse.ArgumentParser):
    """Reports a usage error as one line on stderr (exit code 2), pointing at ``--help``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, dict):
        return json.dumps(value) if value else "none"
    return str(value)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def checked(tp: type, name: str, check):
    """An argparse ``type`` that converts to ``tp`` and applies the field's check with its words."""
    def parse(text: str):
        try:
            value = tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a number' if tp is float else 'an integer'}, "
                                             f"got {text!r}") from None
        try:
            check_value(name, value, check)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(e.problem) from None
        return value
    parse.__name__ = tp.__name__
    return parse


class KeyValue(argparse.Action):
    """``--extra KEY=VALUE`` (repeatable) into a dict; VALUE is read as JSON when it parses."""

    def __call__(self, parser, namespace, text, option_string=None):
        key, sep, raw = text.partition("=")
        if not sep or not key:
            raise argparse.ArgumentError(self, f"expected KEY=VALUE, got {text!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        current = dict(getattr(namespace, self.dest, None) or {})
        current[key] = value
        setattr(namespace, self.dest, current)


def add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of ``cls``: ``--name`` (bools as ``--name/--no-name``), default suppressed."""
    types = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        tp = base_type(types[f.name])
        text = meta["help"] if "default:" in meta["help"] else f"{meta['help']} (default: {show(default)})"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=text)
        if tp is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif tp is dict:
            parser.add_argument(flag(f.name), action=KeyValue, metavar=meta["metavar"] or "KEY=VALUE", **kw)
        else:
            metavar = meta["metavar"] or (None if meta["choices"] else f.name.upper())
            parser.add_argument(flag(f.name), type=checked(tp, f.name, meta["check"]), choices=meta["choices"],
                                metavar=metavar, **kw)


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of ``cls`` whose flags were given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
