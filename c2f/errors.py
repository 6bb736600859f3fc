"""Errors that name the setting at fault; the CLI prints them as one line naming the flag."""
from __future__ import annotations


class ConfigError(ValueError):
    """A setting with a value it cannot take; ``name`` is the setting, ``problem`` says what was expected."""

    def __init__(self, name: str, problem: str):
        self.name, self.problem = name, problem
        super().__init__(f"{name}: {problem}")
