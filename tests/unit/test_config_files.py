"""The config-file plumbing every component shares (fuyao.config_files) and the JSON log lines (fuyao.logs)."""

from __future__ import annotations

import json
import logging

import pytest

from fuyao.config_files import ConfigError, parse_duration
from fuyao.logs import JsonFormatter
from fuyao.scheduler_extender.config import build_config


@pytest.mark.parametrize("spelling", ["leaderElection", "leader_election"])
def test_a_flag_wins_over_the_file_however_the_file_spells_the_key(spelling: str) -> None:
    config = build_config({"version": "v1", spelling: {"enabled": False}}, {"leader_election.enabled": True})
    assert config.leader_election.enabled is True


@pytest.mark.parametrize("raw", ["inf", "nan", "1e400", "-5s", "0"])
def test_a_duration_must_be_finite_and_positive(raw: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(raw)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), "inf"])
def test_a_non_finite_duration_in_a_config_file_names_its_key(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({"version": "v1", "leaderElection": {"leaseDuration": value}}, {})
    assert caught.value.field == "leaderElection.leaseDuration"


def test_json_log_extras_never_replace_the_fixed_fields() -> None:
    record = logging.makeLogRecord({"name": "x", "levelno": logging.WARNING, "levelname": "WARNING", "msg": "m",
                                    "level": "NotHandleFault", "logger": "other", "chip": 3})
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "warning" and line["logger"] == "x" and line["msg"] == "m"
    assert line["extra_level"] == "NotHandleFault" and line["extra_logger"] == "other" and line["chip"] == 3


def test_an_error_names_a_dict_key_as_written() -> None:
    from fuyao.deviceplugin.config import build_config as plugin_config

    with pytest.raises(ConfigError) as caught:
        plugin_config({"version": "v1", "containerEnv": {"ASCEND_RT_VISIBLE_DEVICES": ["x"]}}, {})
    assert caught.value.field == "containerEnv.ASCEND_RT_VISIBLE_DEVICES"
