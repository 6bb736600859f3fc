"""Errors that name what is at fault; the CLI prints each as one line (exit code 2 for a bad setting, 1 for a
run stopped by a non-finite value)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A setting with a value it cannot take; ``name`` is the setting, ``problem`` says what was expected."""

    def __init__(self, name: str, problem: str):
        self.name, self.problem = name, problem
        super().__init__(f"{name}: {problem}")


class NonFiniteError(FloatingPointError):
    """A non-finite loss, gradient, model output or metric; the message names where (epoch and step, or the
    split), the cache rows and what went non-finite."""
