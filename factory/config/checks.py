"""The one error type of bad settings, and the range checks every section's `__post_init__` uses.

Each check raises `ConfigError` naming the full key (`train.steps must be >= 1, got 0`), so a
message always says which value to fix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


def finite(key: str, value: float) -> None:
    """`value` is a number, not NaN or infinite: NaN passes no comparison and inf passes every lower
    bound, so a range check alone lets both through (inf guidance makes black images, a NaN
    learning rate a NaN decoder)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")


def at_least(section: str, obj: object, minimum: float, keys: Iterable[str]) -> None:
    """Every `obj.<key>` is finite and >= minimum."""
    for key in keys:
        value = getattr(obj, key)
        finite(f"{section}.{key}", value)
        if value < minimum:
            raise ConfigError(f"{section}.{key} must be >= {minimum}, got {value}")


def positive(section: str, obj: object, keys: Iterable[str]) -> None:
    """Every `obj.<key>` is finite and > 0."""
    for key in keys:
        value = getattr(obj, key)
        finite(f"{section}.{key}", value)
        if not value > 0:
            raise ConfigError(f"{section}.{key} must be > 0, got {value}")


def one_of(key: str, value: object, choices: Iterable[object]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key} must be one of {choices}, got {value!r}")


def within(key: str, value: float, low: float, high: float, *, open_low: bool = False,
           open_high: bool = False) -> None:
    """low <= value <= high, with either end excluded on request; the message shows the interval."""
    finite(key, value)
    ok = (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ConfigError(f"{key} must be in {interval}, got {value}")


def distinct_subset(key: str, values: list, allowed: Iterable[object]) -> None:
    """A non-empty list drawn from `allowed`, each entry once."""
    allowed = tuple(allowed)
    if not values or any(v not in allowed for v in values) or len(set(values)) != len(values):
        raise ConfigError(f"{key} must list some of {allowed} once each, got {values}")


def no_credentials(key: str, url: str | None) -> None:
    """A URL in a config carries no secret (`user:password@host`, `?api_key=...`): keys come from the
    environment, so that no config, manifest, log line or error message ever holds one. The message
    names the key, never the value."""
    if not url:
        return
    from urllib.parse import parse_qsl, urlsplit

    parts = urlsplit(url)
    secret_query = {"key", "api_key", "apikey", "token", "access_token", "secret", "password",
                    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "signature"}
    rest = url.partition("://")[2]  # a secret with '/' in it cuts the netloc short: look at the whole URL
    if "@" in parts.netloc or ":" in rest.rpartition("@")[0] or any(k.lower() in secret_query for k, _ in parse_qsl(parts.query)):
        raise ConfigError(f"{key} holds a credential (user:password@ or a key in the query); give credentials "
                          "through the environment, never in a config (the value is not shown)")


SHOWN_CLASSES = 16


def classes_hint(classes: list[str], wrong: list[str] | tuple[str, ...] = ()) -> str:
    """How a message shows `labels.classes`: its ids, its names when there are few (a 255-class
    list in every one of a folder's problems would bury them), and the closest name to each wrong one."""
    import difflib

    shown = f"labels.classes: ids 0..{len(classes) - 1}"
    shown += f" {classes}" if len(classes) <= SHOWN_CLASSES else f", {len(classes)} names"
    close = [(w, m[0]) for w in wrong if (m := difflib.get_close_matches(w, classes, n=1))]
    if len(close) == 1 and len(list(wrong)) == 1:
        return shown + f"; did you mean {close[0][1]!r}?"
    return shown + (f"; did you mean {', '.join(f'{m!r} for {w!r}' for w, m in close)}?" if close else "")


def seeds_fit(section: str, start_key: str, start: int, count_key: str, count: int) -> None:
    """Seeds `start` .. `start + count - 1` are 64-bit integers (a sample's seed is an int64 column,
    an exported image is named by its seed): `start` >= 0 and the last below 2**63."""
    if start < 0:
        raise ConfigError(f"{section}.{start_key} must be >= 0, got {start}")
    if start + count > 2**63:
        raise ConfigError(f"{section}.{start_key} + {section}.{count_key} must be at most 2**63 (seeds are 64-bit "
                          f"integers), got {start} + {count}")
