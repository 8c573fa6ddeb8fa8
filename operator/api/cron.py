"""Cron schedules as a Kubernetes CronJob reads them (five fields, or a macro).

The API server checks a CronJob's schedule only when the CronJob is created, long after
the RecommenderSystem was accepted: checking it here makes a typo an admission error of
the RecommenderSystem instead. The grammar is the one of the Go library Kubernetes uses
(robfig/cron, standard parser): `*`, `?` (day of month or week), numbers, ranges `a-b`,
steps `*/n`, `a-b/n` or `a/n`, comma lists, month and weekday names.
"""

from __future__ import annotations

import re

CRON_PATTERN = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|\S+( +\S+){4})$"
"""The shape only (CRD schema); `cron_problem` checks every field's values."""

MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
WEEKDAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, MONTHS),
    ("day of week", 0, 6, WEEKDAYS),
)
_NUMBER = re.compile(r"^[0-9]+$")


def cron_problem(schedule: str) -> str | None:
    """Why `schedule` is not a valid CronJob schedule, or None when it is."""
    text = schedule.strip()
    if text.startswith(("TZ=", "CRON_TZ=")):
        return "a time zone inside the schedule is not allowed; use timeZone"
    if text.startswith("@"):
        return None if text in MACROS else f"unknown macro {text!r}; use one of {', '.join(MACROS)}"
    parts = text.split()
    if len(parts) != 5:
        return f"{schedule!r} has {len(parts)} fields; a schedule has 5 (minute hour day month weekday)"
    for part, (name, low, high, names) in zip(parts, _FIELDS, strict=True):
        for item in part.split(","):
            problem = _item_problem(item, name, low, high, names)
            if problem:
                return problem
    return None


def _item_problem(item: str, name: str, low: int, high: int, names: tuple[str, ...]) -> str | None:
    span, slash, step = item.partition("/")
    if slash and (not _NUMBER.match(step) or int(step) == 0):
        return f"{name}: step {step!r} in {item!r} must be a positive number"
    if span in ("*", "?"):
        if span == "?" and name not in ("day of month", "day of week"):
            return f"{name}: '?' is allowed only for the day of month or week"
        return None
    start, dash, end = span.partition("-")
    values = []
    for value in (start, end) if dash else (start,):
        number = _value(value, names)
        if number is None or not low <= number <= high:
            return f"{name}: {value!r} in {item!r} is not in {low}-{high}"
        values.append(number)
    if dash and values[0] > values[1]:
        return f"{name}: range {span!r} runs backwards"
    return None


def _value(text: str, names: tuple[str, ...]) -> int | None:
    if _NUMBER.match(text):
        return int(text)
    upper = text.upper()
    if upper in names:
        return names.index(upper) + (1 if names is MONTHS else 0)
    return None
