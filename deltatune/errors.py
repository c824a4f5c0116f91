"""User-facing errors: one line, naming file, line and field, and exit code 2.

Everything a user can get wrong (a bad record, an unknown option, a missing package) raises
`UserError`; the CLI prints its message on one line and exits with `exit_code`, never a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input or set-up, reported as one line."""

    exit_code: int = 2

    def __init__(
        self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None
    ) -> None:
        self.message, self.file, self.line, self.field = message, file, line, field
        where = ""
        if file is not None:
            where = f"{file}"
            if line is not None:
                where += f":{line}"
            if field is not None:
                where += f": field '{field}'"
            where += ": "
        elif field is not None:
            where = f"field '{field}': "
        super().__init__(f"{where}{message}")

    def blamed_on(self, field: str) -> UserError:
        """The same error naming another field: the flag the user gave, where a helper named its own argument."""
        return type(self)(self.message, file=self.file, line=self.line, field=field)


class DataError(UserError):
    """A record that cannot be read or turned into an example."""


class ConfigError(UserError):
    """A configuration key or value that is not allowed."""


class TrainingError(Exception):
    """A run that cannot continue (NaN loss, a batch with no loss-bearing tokens)."""

    exit_code: int = 3
