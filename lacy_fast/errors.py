"""Errors a user can cause and fix.

The command line prints a UserError as one sentence and exits with code 2, never with a
traceback. Raise it with a message that names the thing at fault and the fix.
"""


class UserError(Exception):
    """Bad input from the user: a path, a config key or value, a malformed file."""


class ConfigError(UserError):
    """A configuration key or value that cannot be used.

    ``key`` is the dotted path of the field ("train.lr"); nested configs prefix it as the
    error travels up, so the message always names the full key.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.detail = message
        super().__init__(f"config key '{key}' {message}")

    def under(self, prefix: str) -> "ConfigError":
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.detail)
