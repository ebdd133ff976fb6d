"""Exceptions shared by the daemon's modules, kept apart so no module imports another
only for an exception type (core.py raised server.py's StartupError through a lazy import)."""

from __future__ import annotations


class StartupError(Exception):
    """A reason the daemon cannot start, worded for the person who started it."""
