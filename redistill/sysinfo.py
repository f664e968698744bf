"""Moved to ``redistill.report`` (the one helper of every results writer); delete once nothing imports this."""

from redistill.report import cpu_model, machine_line  # noqa: F401
