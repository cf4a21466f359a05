"""The one exception type for data a user can fix (a bad file, a bad blend, a bad tokenizer).

It subclasses `ConfigError`, so every CLI that already turns configuration mistakes into one
line and exit code 2 does the same for data mistakes.
"""

from __future__ import annotations

from xmoe.config import ConfigError


class DataError(ConfigError):
    """Bad input data; the message names the file (or field) and the problem."""
