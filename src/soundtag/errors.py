"""Errors meant for people: the CLI prints their message, never a traceback."""


class SoundtagError(Exception):
    """A user mistake or unusable input, with a message that says what to fix."""


class DataError(SoundtagError):
    """A dataset folder or label file that cannot be read as asked."""


class ConfigError(SoundtagError):
    """An unknown or invalid option in a config, preset or command line."""
