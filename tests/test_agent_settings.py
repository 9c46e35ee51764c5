"""agent.toml: defaults, the shipped example, and every kind of bad value refused by name."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import pytest

from certfleet.agent.settings import (
    AgentSettings,
    Renewal,
    SettingsError,
    load_settings,
    parse_settings,
)


def parse(text: str) -> AgentSettings:
    return parse_settings(tomllib.loads(text), "agent.toml")


def refused(text: str) -> str:
    with pytest.raises(SettingsError) as caught:
        parse(text)
    return str(caught.value)


def test_an_empty_file_means_the_defaults():
    assert parse("") == AgentSettings()
    assert AgentSettings().poll_interval == 300 and AgentSettings().renewal == Renewal()


def test_the_shipped_example_lists_every_setting_with_its_default():
    example = (resources.files("certfleet.agent") / "data" / "agent.toml.example").read_text()
    assert parse(example) == AgentSettings()
    uncommented = example.replace("# hsm_pin_file", "hsm_pin_file").replace(
        "# est_server", "est_server"
    )
    keys = set(tomllib.loads(uncommented)) | {
        f"renewal.{k}" for k in tomllib.loads(uncommented)["renewal"]
    }
    fields = set(AgentSettings.__dataclass_fields__) | {
        f"renewal.{k}" for k in Renewal.__dataclass_fields__
    }
    assert keys == fields, "the example must name every setting"


def test_every_value_is_read():
    settings = parse(
        'sota_config = "/etc/sota/sota.toml"\nstate_dir = "/data/agent"\n'
        'secrets_dir = "/run/cf"\nhandlers_dir = "/opt/handlers"\npoll_interval = 60\n'
        'poll_jitter_share = 0\nrestart_commands = [["systemctl", "restart", "ota"]]\n'
        'hsm_pin_file = "/etc/pin"\n'
        "[renewal]\nenabled = false\nafter_share = 0.5\njitter_share = 0.1\n"
        'est_server = "https://est.example:8443"\n'
    )
    assert settings == AgentSettings(
        sota_config=Path("/etc/sota/sota.toml"),
        state_dir=Path("/data/agent"),
        secrets_dir=Path("/run/cf"),
        handlers_dir=Path("/opt/handlers"),
        poll_interval=60.0,
        poll_jitter_share=0.0,
        restart_commands=(("systemctl", "restart", "ota"),),
        hsm_pin_file=Path("/etc/pin"),
        renewal=Renewal(False, 0.5, 0.1, "https://est.example:8443"),
    )
    assert isinstance(settings.poll_interval, float)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("poll_intervall = 5", "unknown setting 'poll_intervall'"),
        ("[renewal]\nafter = 0.5", "[renewal]: unknown setting 'after'"),
        ("[extra]\nx = 1", "unknown setting 'extra'"),
        ("renewal = 1", "[renewal] must be a table"),
        ('state_dir = "relative/dir"', "state_dir must be an absolute path"),
        ("secrets_dir = 5", "secrets_dir must be an absolute path"),
        ('hsm_pin_file = ""', "hsm_pin_file must be an absolute path"),
        ('poll_interval = "300"', "poll_interval must be a number from 1 to 86400"),
        ("poll_interval = true", "poll_interval must be a number"),
        ("poll_interval = 0.5", "poll_interval must be a number from 1 to 86400"),
        ("poll_interval = 100000", "poll_interval must be a number"),
        ("poll_interval = inf", "poll_interval must be a number"),
        ("poll_interval = nan", "poll_interval must be a number"),
        ("poll_jitter_share = -0.1", "poll_jitter_share must be a number from 0 to 1"),
        ('restart_commands = "systemctl restart ota"', "restart_commands must be a list"),
        ('restart_commands = ["systemctl", "restart"]', "restart_commands must be a list"),
        ("restart_commands = [[]]", "restart_commands must be a list"),
        ('restart_commands = [["systemctl", ""]]', "restart_commands must be a list"),
        ("restart_commands = [[1, 2]]", "restart_commands must be a list"),
        ('[renewal]\nenabled = "yes"', "enabled must be true or false"),
        ("[renewal]\nafter_share = 1", "after_share must be a number from 0.05 to 0.95"),
        ("[renewal]\njitter_share = 0.6", "jitter_share must be a number from 0 to 0.5"),
        ('[renewal]\nest_server = "http://est"', "est_server must be an https:// URL"),
        ("[renewal]\nest_server = 443", "est_server must be an https:// URL"),
    ],
)
def test_bad_values_are_refused_by_name(text, message):
    assert message in refused(text)


def test_load_settings_reports_the_file(tmp_path):
    broken = tmp_path / "agent.toml"
    broken.write_text("poll_interval = \n")
    with pytest.raises(SettingsError, match=r"agent.toml is not valid TOML"):
        load_settings(broken)
    with pytest.raises(SettingsError, match=r"cannot read .*missing.toml"):
        load_settings(tmp_path / "missing.toml")
    broken.write_text("poll_interval = 2\nsecrets = 1\n")
    with pytest.raises(SettingsError, match=rf"{broken}: unknown setting 'secrets'"):
        load_settings(broken)


def test_the_hsm_pin_is_the_first_line_of_its_file(tmp_path):
    pin = tmp_path / "pin"
    pin.write_text("1234  \nsecond line\n")
    assert AgentSettings(hsm_pin_file=pin).hsm_pin() == "1234"
    assert AgentSettings().hsm_pin() is None
    pin.write_text("")
    with pytest.raises(SettingsError, match="cannot read a PIN"):
        AgentSettings(hsm_pin_file=pin).hsm_pin()
    with pytest.raises(SettingsError, match="cannot read a PIN"):
        AgentSettings(hsm_pin_file=tmp_path / "nothing").hsm_pin()
