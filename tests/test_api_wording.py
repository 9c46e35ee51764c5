"""Messages of the shared fleet layer as the admin API words them: options become fields."""

from __future__ import annotations

import pytest

from certfleet.api.errors import api_wording


@pytest.mark.parametrize(
    ("message", "worded"),
    [
        ("give --est-server URL: the EST address", "give 'est_server' URL: the EST address"),
        ("--rate 0/min must be at least 1/min", "'rate_per_minute' 0/min must be at least 1/min"),
        ("--group G, --all, --reissue-from-ca", "'group' G, 'all', 'reissue_from_ca'"),
        ("deny it by --sha256 instead", "deny it by 'sha256' instead"),
        ("no option here - or -- here", "no option here - or -- here"),
        ("run `certfleet x --reason r` first", "run `certfleet x --reason r` first"),
        ("a--b stays", "a--b stays"),
    ],
)
def test_options_become_field_names_outside_shell_commands(message: str, worded: str):
    assert api_wording(message) == worded
