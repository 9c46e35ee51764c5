"""Durations as operators type them, shared by the CLI and the admin API."""

from __future__ import annotations

import datetime as dt

import pytest

from certfleet.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), (" 12H ", 43200), ("7d", 604800), ("2w", 1209600),
     ("36500d", 36500 * 86400), ("007d", 604800)],
)  # fmt: skip
def test_units(text: str, seconds: int):
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0d", "000s", "-3d", "1.5h", "3", "d", "3y", "٣d", "1e9w"])
def test_not_a_positive_duration(text: str):
    with pytest.raises(ValueError, match="is not a positive duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["36501d", "5215w", "545840w", "999999999999w"])
def test_past_a_hundred_years(text: str):
    with pytest.raises(ValueError, match="is longer than 36500d"):
        parse_duration(text)
