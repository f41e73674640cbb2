"""The configuration object and the `serve` flags built from it (config.py)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from akidb_embed.api.config import SETTINGS, ServerConfig, Setting, add_settings, apply_settings
from akidb_embed.cli import main as cli
from akidb_embed.modeling.precision import Choice, CpuPrecision, ModelPrecision

MIB = 2**20


def defaults() -> ServerConfig:
    return ServerConfig(precision=ModelPrecision())


def parse(argv: list[str], environ: dict[str, str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_settings(parser, environ or {})
    return apply_settings(defaults(), parser.parse_args(argv))


def test_every_setting_names_a_field_once() -> None:
    assert len({s.flag for s in SETTINGS}) == len(SETTINGS)
    assert len({s.path for s in SETTINGS}) == len(SETTINGS)
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)
    for setting in SETTINGS:
        setting.field_default()  # raises AttributeError on a wrong path
        assert setting.env.startswith("AKIDB_EMBED_") and setting.help


def test_no_flags_give_the_dataclass_defaults() -> None:
    assert parse([]) == defaults()


def test_flags_set_their_fields_in_their_units() -> None:
    config = parse(
        [
            "--stream-window", "77", "--bulk-batch-ms", "10", "--max-loaded-mb", "5",
            "--max-message-mb", "2", "--max-chars-in-flight", "1000", "--keep-alive", "0",
            "--socket-mode", "660", "--allow-downloads", "--pull-timeout", "1.5",
            "--cpu-precision", "fp32", "--dequantize", "never", "--metrics-port", "0",
        ]
    )  # fmt: skip
    assert config.stream_window == 77
    assert config.bulk_batch_seconds == pytest.approx(0.010)
    assert config.budget.max_bytes == 5 * MIB and isinstance(config.budget.max_bytes, int)
    assert config.max_message_bytes == 2 * MIB
    assert config.limits.max_chars_in_flight == 1000
    assert config.limits.max_texts_per_request == defaults().limits.max_texts_per_request
    assert config.budget.keep_alive_seconds == 0
    assert config.socket_mode == 0o660
    assert config.allow_downloads is True
    assert config.pulls.timeout_s == 1.5
    assert config.precision == ModelPrecision(CpuPrecision.FP32, Choice.NEVER, Choice.AUTO)
    assert config.metrics_port == 0


def test_the_environment_sets_defaults_and_the_flag_wins() -> None:
    env = {
        "AKIDB_EMBED_STREAM_WINDOW": "123",
        "AKIDB_EMBED_ALLOW_DOWNLOADS": "yes",
        "AKIDB_EMBED_CPU_PRECISION": "bf16",
        "AKIDB_EMBED_MAX_LOADED_MB": "7",
    }
    config = parse([], env)
    assert config.stream_window == 123
    assert config.allow_downloads is True
    assert config.precision.cpu is CpuPrecision.BF16
    assert config.budget.max_bytes == 7 * MIB
    flagged = parse(["--stream-window", "5", "--no-allow-downloads"], env)
    assert flagged.stream_window == 5 and flagged.allow_downloads is False


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("AKIDB_EMBED_STREAM_WINDOW", "many", "AKIDB_EMBED_STREAM_WINDOW"),
        ("AKIDB_EMBED_CPU_PRECISION", "fp16", "use one of auto, fp32, bf16"),
        ("AKIDB_EMBED_ALLOW_DOWNLOADS", "perhaps", "not a boolean"),
    ],
)
def test_a_bad_environment_value_is_refused_by_name(
    name: str, value: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse([], {name: value})
    assert words in capsys.readouterr().err


def test_help_names_each_default_and_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for setting in SETTINGS:
        assert setting.flag in text and f"${setting.env}" in text
    assert "(default 4096; $AKIDB_EMBED_STREAM_WINDOW)" in text


def test_a_new_setting_takes_its_type_and_default_from_the_field() -> None:
    setting = Setting("--max-chars-per-text", "limits.max_chars_per_text", "x")
    assert setting.flag_type() is int
    assert setting.flag_default() == defaults().limits.max_chars_per_text
    scaled = Setting("--bulk-fill-ms", "bulk_fill_seconds", "x", scale=1 / 1000)
    assert scaled.flag_default() == pytest.approx(defaults().bulk_fill_seconds * 1000)
    assert dataclasses.is_dataclass(defaults().limits)
