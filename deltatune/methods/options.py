"""One way to read a method's options: each method declares a schema, `read_options` checks against it.

A schema maps each option name to an `Option` (default, accepted types, allowed values, one-line help).
An unknown name is a one-line ConfigError listing the valid ones; a wrong type or value names the
option and what is allowed. Methods read their options only through this, so every method reports
bad options the same way and `docs/adding-a-method.md` has one pattern to copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from deltatune.errors import ConfigError


@dataclass(frozen=True)
class Option:
    default: Any
    help: str = ""
    types: tuple[type, ...] = ()  # accepted Python types ((), any); bool is never accepted as int/float
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None  # returns why the value is wrong, or None


def positive_int(value: Any) -> str | None:
    return None if value >= 1 else "must be a positive integer"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


def even_at_least_2(value: Any) -> str | None:
    return None if value >= 2 and value % 2 == 0 else "must be an even number >= 2"


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if not types or value is None:
        return True
    if isinstance(value, bool):
        return bool in types
    if float in types and isinstance(value, int):
        return True
    return isinstance(value, types)


def read_options(method: str, given: Mapping[str, Any], schema: Mapping[str, Option]) -> dict[str, Any]:
    """`given` checked against `schema`, with defaults filled in. Errors are one line naming the option."""
    unknown = sorted(set(given) - set(schema))
    if unknown:
        valid = ", ".join(sorted(schema)) if schema else "none (this method takes no options)"
        raise ConfigError(
            f"unknown option '{unknown[0]}' for method '{method}'; valid options: {valid}",
            field=f"options.{unknown[0]}",
        )
    out: dict[str, Any] = {}
    for name, opt in schema.items():
        value = given.get(name, opt.default)
        if name in given and value is not None:
            if not _type_ok(value, opt.types):
                kinds = " or ".join(t.__name__ for t in opt.types)
                raise ConfigError(
                    f"method '{method}': option {name} must be {kinds}, got {value!r}", field=f"options.{name}"
                )
            if opt.choices is not None:
                norm = value.lower() if isinstance(value, str) else value
                if norm not in opt.choices:
                    raise ConfigError(
                        f"method '{method}': option {name} must be one of "
                        f"{', '.join(map(str, opt.choices))}, got {value!r}",
                        field=f"options.{name}",
                    )
                value = norm
            why = opt.check(value) if opt.check is not None else None
            if why:
                raise ConfigError(f"method '{method}': option {name} {why}, got {value!r}", field=f"options.{name}")
        out[name] = value
    return out


def describe(schema: Mapping[str, Option]) -> str:
    """One line per option, for docstrings and `--help` texts."""
    return "\n".join(f"{name} (default {opt.default!r}): {opt.help}" for name, opt in schema.items())
