"""A bad configuration fails with one line: the field, the value, its source, what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config


def error_from_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(path, env={})
    return str(e.value).replace(str(path), "C")


def error_from_env(env: dict[str, str]) -> str:
    with pytest.raises(config.ConfigError) as e:
        config.load(env=env)
    return str(e.value)


def test_out_of_range_value_names_field_value_source_and_limit(tmp_path: Path) -> None:
    message = error_from_file(tmp_path, "[images]\nmax_concurrent_downloads = 0\n")
    assert message == (
        "invalid configuration: images.max_concurrent_downloads = 0 (from file C): "
        "Input should be greater than or equal to 1"
    )


def test_bad_choice_lists_the_allowed_values(tmp_path: Path) -> None:
    message = error_from_file(tmp_path, '[images]\nsnapshotter = "btrfs"\n')
    assert message == (
        'invalid configuration: images.snapshotter = "btrfs" (from file C): '
        "Input should be 'auto', 'overlayfs', 'naive', 'containerd' or 'cri'"
    )


def test_bad_duration_shows_the_accepted_form(tmp_path: Path) -> None:
    message = error_from_file(tmp_path, '[images]\nimage_pull_progress_timeout = "5 minutes"\n')
    assert message.startswith(
        'invalid configuration: images.image_pull_progress_timeout = "5 minutes" (from file C): '
        "invalid duration '5 minutes'"
    )
    assert "'5m', '1m30s'" in message


def test_negative_duration_is_rejected(tmp_path: Path) -> None:
    message = error_from_file(tmp_path, '[runtime]\ngc_period = "-1m"\n')
    assert "runtime.gc_period" in message and "must not be negative" in message


def test_bad_address_shows_examples() -> None:
    message = error_from_env({"PREFETCHER_RUNTIME__METRICS_ADDRESS": "9090"})
    assert message.startswith(
        'invalid configuration: runtime.metrics_address = "9090" '
        "(from env PREFETCHER_RUNTIME__METRICS_ADDRESS): invalid address '9090'"
    )
    assert "':9090'" in message and "'' to disable" in message


def test_bad_value_from_the_environment_names_the_variable() -> None:
    message = error_from_env({"PREFETCHER_IMAGES__MAX_CONCURRENT_DOWNLOADS": "many"})
    assert message.startswith(
        'invalid configuration: images.max_concurrent_downloads = "many" '
        "(from env PREFETCHER_IMAGES__MAX_CONCURRENT_DOWNLOADS): "
    )
    assert "integer" in message


def test_bad_value_from_a_flag_says_so() -> None:
    with pytest.raises(config.ConfigError) as e:
        config.load(overrides={"images": {"image_pull_progress_timeout": "soon"}}, env={})
    assert "(from command-line flag)" in str(e.value)


def test_unknown_key_is_an_error_with_a_did_you_mean(tmp_path: Path) -> None:
    message = error_from_file(tmp_path, "[images]\nmax_concurent_downloads = 2\n")
    assert message == (
        "invalid configuration: unknown key 'images.max_concurent_downloads' (from file C); "
        "did you mean 'images.max_concurrent_downloads'?"
    )


def test_key_in_the_wrong_section_points_at_the_right_one(tmp_path: Path) -> None:
    message = error_from_file(tmp_path, '[runtime]\nsnapshotter = "naive"\n')
    assert message.endswith("did you mean 'images.snapshotter'?")


def test_misspelled_section_is_an_error(tmp_path: Path) -> None:
    message = error_from_file(tmp_path, "[image]\nsnapshotter = 'naive'\n")
    assert message == (
        "invalid configuration: unknown key 'image' (from file C); did you mean 'images'?"
    )


def test_unknown_key_without_a_close_match_has_no_hint(tmp_path: Path) -> None:
    message = error_from_file(tmp_path, "[tracing]\nzzz = 1\n")
    assert message == "invalid configuration: unknown key 'tracing.zzz' (from file C)"


def test_unknown_environment_key_is_an_error_with_a_hint() -> None:
    message = error_from_env({"PREFETCHER_IMAGES__SNAPSHOTER": "naive"})
    assert message == (
        "invalid configuration: unknown key 'images.snapshoter' "
        "(from env PREFETCHER_IMAGES__SNAPSHOTER); did you mean 'images.snapshotter'?"
    )


def test_unknown_environment_section_is_an_error_with_a_hint() -> None:
    message = error_from_env({"PREFETCHER_IMAGE__SNAPSHOTTER": "naive"})
    assert message.startswith("environment variable PREFETCHER_IMAGE__SNAPSHOTTER: ")
    assert message.endswith("did you mean 'PREFETCHER_IMAGES'?")


def test_unrelated_prefetcher_variables_are_left_alone() -> None:
    assert config.load(env={"PREFETCHER_CONFIG": "", "PREFETCHER_HOME": "/x"}).version == 2


def test_environment_table_that_is_not_json_names_the_variable() -> None:
    message = error_from_env({"PREFETCHER_IMAGES__REGISTRY__HEADERS": "User-Agent=x"})
    assert message == (
        "environment variable PREFETCHER_IMAGES__REGISTRY__HEADERS = 'User-Agent=x': "
        'expected a JSON object such as {"User-Agent": "acme"}'
    )


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[images]\nmax_concurrent_downloads = 0\n[runtime]\nlog_level = 'loud'\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(path, env={})
    assert len(e.value.problems) == 2
    assert "images.max_concurrent_downloads" in e.value.problems[0]
    assert "runtime.log_level" in e.value.problems[1]
    assert "\n" not in str(e.value)


def test_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    message = error_from_file(tmp_path, "[images]\nsnapshotter = 'naive'\nmax = \n")
    assert message.startswith("config file C: invalid TOML: ")
    assert "line 3" in message


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"config file .*: cannot read: "):
        config.load(tmp_path, env={})  # a directory


def test_a_value_of_the_wrong_type_names_the_field(tmp_path: Path) -> None:
    message = error_from_file(tmp_path, "[images]\nimage_pull_with_sync_fs = 'maybe'\n")
    assert message.startswith(
        'invalid configuration: images.image_pull_with_sync_fs = "maybe" (from file C): '
    )
    assert "boolean" in message
