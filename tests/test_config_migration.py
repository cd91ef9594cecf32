"""Version 1 files (one mixed ``[agent]`` table) are migrated to version 2, with one warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent import config

V1 = """\
[agent]
node_name = "node-a"
root = "/srv/prefetcher"
state_dir = "/run/pf"
metrics_port = 9100
health_port = 0
log_level = "debug"
log_json = true
max_concurrent_downloads = 4
max_downloads_per_node = 12
image_pull_progress_timeout = "1m30s"
sync_fs = true
pinned_images = ["registry.k8s.io/pause:3.9"]
registry_config_path = "/etc/prefetcher/certs.d"
registry_mirrors = { "docker.io" = ["https://mirror.gcr.io"] }
gc_interval = "30m"
tracing = false
"""

V2_EQUIVALENT = """\
version = 2
[images]
max_concurrent_downloads = 4
node_max_concurrent_downloads = 12
image_pull_progress_timeout = "1m30s"
image_pull_with_sync_fs = true
pinned_images = ["registry.k8s.io/pause:3.9"]
[images.registry]
config_path = "/etc/prefetcher/certs.d"
mirrors = { "docker.io" = ["https://mirror.gcr.io"] }
[runtime]
node_name = "node-a"
root = "/srv/prefetcher"
state = "/run/pf"
metrics_address = ":9100"
health_address = ""
log_level = "debug"
log_format = "json"
gc_period = "30m"
[tracing]
enabled = false
"""


def test_migrate_splits_the_agent_table_into_images_runtime_and_tracing() -> None:
    v2, notes = config.migrate(config.parse_toml(V1, "v1.toml"))
    assert v2 == config.parse_toml(V2_EQUIVALENT, "v2.toml")


def test_migrate_names_every_moved_key() -> None:
    _, notes = config.migrate(config.parse_toml(V1, "v1.toml"))
    assert "agent.sync_fs → images.image_pull_with_sync_fs" in notes
    assert 'agent.metrics_port → runtime.metrics_address = ":9100"' in notes
    assert 'agent.log_json → runtime.log_format = "json"' in notes
    assert "agent.state_dir → runtime.state" in notes
    assert len(notes) == len(config.parse_toml(V1, "v1.toml")["agent"])


def test_migrate_points_mirrors_users_at_hosts_toml() -> None:
    _, notes = config.migrate({"agent": {"registry_mirrors": {"docker.io": ["https://m"]}}})
    assert notes == [
        "agent.registry_mirrors → images.registry.mirrors "
        "(prefer a hosts.toml per registry under config_path)"
    ]


def test_a_version_1_file_loads_like_its_version_2_form(tmp_path: Path) -> None:
    old = tmp_path / "old.toml"
    new = tmp_path / "new.toml"
    old.write_text(V1)
    new.write_text(V2_EQUIVALENT)
    assert config.load(old, env={}) == config.load(new, env={})


def test_loading_a_version_1_file_warns_once_naming_each_moved_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = tmp_path / "old.toml"
    old.write_text(V1)
    with caplog.at_level(logging.WARNING, logger="agent.config"):
        settings = config.load(old, env={})
    assert settings.images.image_pull_with_sync_fs is True
    assert settings.images.image_pull_progress_timeout == 90.0
    warnings = [r for r in caplog.records if r.name == "agent.config"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert str(old) in message
    assert "version 1" in message
    assert f"prefetcher config migrate {old}" in message
    for key in config.parse_toml(V1, "v1")["agent"]:
        assert f"agent.{key} → " in message


def test_an_explicit_version_1_is_migrated_too(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.config"):
        settings = config.from_toml("version = 1\n[agent]\nsync_fs = true\n", env={})
    assert settings.images.image_pull_with_sync_fs is True
    assert len(caplog.records) == 1


def test_a_version_2_file_loads_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.config"):
        config.from_toml(V2_EQUIVALENT, env={})
        config.from_toml("[images]\nsnapshotter = 'naive'\n", env={})  # no version: 2
    assert caplog.records == []


def test_environment_still_overrides_a_migrated_file(tmp_path: Path) -> None:
    old = tmp_path / "old.toml"
    old.write_text(V1)
    env = {"PREFETCHER_IMAGES__IMAGE_PULL_WITH_SYNC_FS": "false"}
    assert config.load(old, env=env).images.image_pull_with_sync_fs is False


def test_an_unknown_version_1_key_is_rejected_with_a_hint() -> None:
    with pytest.raises(config.ConfigError) as e:
        config.from_toml("[agent]\nsync_fss = true\n", source="old.toml", env={})
    assert str(e.value) == (
        "config file old.toml: unknown key 'agent.sync_fss' in a version 1 file; "
        "did you mean 'agent.sync_fs'?"
    )


def test_a_bad_version_1_port_is_rejected() -> None:
    with pytest.raises(config.ConfigError, match=r"agent.metrics_port = \"x\": expected a port"):
        config.from_toml("[agent]\nmetrics_port = 'x'\n", env={})


def test_an_unsupported_version_is_rejected() -> None:
    with pytest.raises(config.ConfigError) as e:
        config.from_toml("version = 3\n", source="c.toml", env={})
    assert str(e.value) == (
        "config file c.toml: version = 3 is not supported; allowed: 1 (migrated on load) or 2"
    )


def test_migrated_data_writes_as_toml_that_loads_back() -> None:
    v2, _ = config.migrate(config.parse_toml(V1, "v1.toml"))
    text = config.to_toml(v2)
    assert config.parse_toml(text, "out") == v2
    assert text.startswith("version = 2\n")
