"""Where settings come from, and which source wins: defaults < Downward API < file < env < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def no_default_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point the well-known path at a file that does not exist unless a test writes it."""
    path = tmp_path / "etc" / "config.toml"
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", path)
    return path


def test_defaults_apply_when_nothing_is_configured() -> None:
    settings = config.load(env={})
    assert settings.version == 2
    assert settings.images.snapshotter == "overlayfs"
    assert settings.images.max_concurrent_downloads == 3
    assert settings.images.image_pull_progress_timeout == 300.0
    assert settings.images.image_pull_with_sync_fs is False
    assert settings.images.registry.config_path == ""
    assert settings.images.containerd.address == "/run/containerd/containerd.sock"
    assert settings.images.containerd.namespace == "k8s.io"
    assert settings.runtime.log_level == "info"
    assert settings.tracing.enabled is True


def test_root_default_depends_on_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config.os, "geteuid", lambda: 0)
    assert config.load(env={}).runtime.root == Path("/var/lib/prefetcher")
    monkeypatch.setattr(config.os, "geteuid", lambda: 1000)
    assert config.load(env={}).runtime.root == Path.home() / ".local/share/prefetcher"


def test_file_given_as_path_overrides_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml", '[images]\nmax_concurrent_downloads = 5\nsnapshotter = "naive"\n'
    )
    settings = config.load(path, env={})
    assert settings.images.max_concurrent_downloads == 5
    assert settings.images.snapshotter == "naive"
    assert settings.images.node_max_concurrent_downloads == 8  # untouched default


def test_file_named_by_prefetcher_config_is_read(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[runtime]\nnode_name = 'from-file'\n")
    settings = config.load(env={"PREFETCHER_CONFIG": str(path)})
    assert settings.runtime.node_name == "from-file"


def test_path_argument_beats_prefetcher_config(tmp_path: Path) -> None:
    a = write(tmp_path / "a.toml", "[runtime]\nnode_name = 'a'\n")
    b = write(tmp_path / "b.toml", "[runtime]\nnode_name = 'b'\n")
    assert config.load(a, env={"PREFETCHER_CONFIG": str(b)}).runtime.node_name == "a"


def test_well_known_file_is_read_only_if_present(no_default_file: Path) -> None:
    assert config.load(env={}).runtime.log_level == "info"
    no_default_file.parent.mkdir()
    write(no_default_file, "[runtime]\nlog_level = 'debug'\n")
    assert config.load(env={}).runtime.log_level == "debug"


def test_explicitly_named_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"config file .*nope\.toml: not found"):
        config.load(tmp_path / "nope.toml", env={})
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(env={"PREFETCHER_CONFIG": str(tmp_path / "nope.toml")})


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[images]\nmax_concurrent_downloads = 5\n")
    env = {"PREFETCHER_IMAGES__MAX_CONCURRENT_DOWNLOADS": "7"}
    assert config.load(path, env=env).images.max_concurrent_downloads == 7


def test_environment_names_are_case_insensitive() -> None:
    env = {"prefetcher_images__max_concurrent_downloads": "6"}
    assert config.load(env=env).images.max_concurrent_downloads == 6


def test_environment_reaches_nested_sections() -> None:
    env = {
        "PREFETCHER_IMAGES__CONTAINERD__NAMESPACE": "custom",
        "PREFETCHER_IMAGES__REGISTRY__CONFIG_PATH": "/etc/prefetcher/certs.d",
        "PREFETCHER_TRACING__ENABLED": "false",
    }
    settings = config.load(env=env)
    assert settings.images.containerd.namespace == "custom"
    assert settings.images.registry.config_path == "/etc/prefetcher/certs.d"
    assert settings.tracing.enabled is False


@pytest.mark.parametrize("value", ["pause:3.9,busybox", '["pause:3.9", "busybox"]'])
def test_environment_lists_are_comma_separated_or_json(value: str) -> None:
    settings = config.load(env={"PREFETCHER_IMAGES__PINNED_IMAGES": value})
    assert settings.images.pinned_images == ["pause:3.9", "busybox"]


def test_environment_tables_are_json_objects() -> None:
    env = {"PREFETCHER_IMAGES__REGISTRY__HEADERS": '{"User-Agent": "acme"}'}
    assert config.load(env=env).images.registry.headers == {"User-Agent": "acme"}


def test_flags_override_the_environment_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[images]\nimage_pull_progress_timeout = "1m"\n')
    env = {"PREFETCHER_IMAGES__IMAGE_PULL_PROGRESS_TIMEOUT": "2m"}
    settings = config.load(path, {"images": {"image_pull_progress_timeout": "30s"}}, env=env)
    assert settings.images.image_pull_progress_timeout == 30.0


def test_flags_left_unset_override_nothing(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[images]\nmax_concurrent_downloads = 5\n")
    overrides = {"images": {"max_concurrent_downloads": None}, "runtime": {"root": None}}
    settings = config.load(path, overrides, env={})
    assert settings.images.max_concurrent_downloads == 5


def test_flags_may_use_dotted_names() -> None:
    overrides = {"images.registry.config_path": "/d", "runtime.root": "/r"}
    settings = config.load(overrides=overrides, env={})
    assert settings.images.registry.config_path == "/d"
    assert settings.runtime.root == Path("/r")


def test_tables_merge_key_by_key_across_sources(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[images]\nmax_concurrent_downloads = 5\n")
    env = {"PREFETCHER_IMAGES__SNAPSHOTTER": "naive"}
    settings = config.load(path, {"images": {"discard_unpacked_layers": True}}, env=env)
    assert settings.images.max_concurrent_downloads == 5
    assert settings.images.snapshotter == "naive"
    assert settings.images.discard_unpacked_layers is True


def test_downward_api_variables_fill_node_and_namespace() -> None:
    settings = config.load(env={"NODE_NAME": "node-a", "POD_NAMESPACE": "ops"})
    assert settings.runtime.node_name == "node-a"
    assert settings.runtime.namespace == "ops"


def test_downward_api_variables_lose_to_the_file_and_prefetcher_variables(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[runtime]\nnode_name = 'file-node'\n")
    env = {"NODE_NAME": "downward", "POD_NAMESPACE": "ops", "PREFETCHER_RUNTIME__NAMESPACE": "x"}
    settings = config.load(path, env=env)
    assert settings.runtime.node_name == "file-node"
    assert settings.runtime.namespace == "x"


def test_load_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFETCHER_RUNTIME__LOG_FORMAT", "json")
    assert config.load().runtime.log_format == "json"


def test_env_argument_replaces_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFETCHER_RUNTIME__LOG_FORMAT", "json")
    assert config.load(env={}).runtime.log_format == "text"


def test_a_bare_settings_object_reads_prefetcher_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFETCHER_IMAGES__MAX_CONCURRENT_DOWNLOADS", "4")
    assert config.Settings().images.max_concurrent_downloads == 4


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m", 300.0), ("1m30s", 90.0), ("0", 0.0), ("250ms", 0.25), ("1h", 3600.0), (45, 45.0)],
)
def test_durations_accept_go_style_text_and_seconds(
    tmp_path: Path, text: object, seconds: float
) -> None:
    value = f'"{text}"' if isinstance(text, str) else str(text)
    path = write(
        tmp_path / "c.toml",
        f"[images]\nimage_pull_progress_timeout = {value}\n[runtime]\ngc_period = {value}\n",
    )
    settings = config.load(path, env={})
    assert settings.images.image_pull_progress_timeout == seconds
    assert settings.runtime.gc_period == seconds


def test_durations_from_the_environment_are_parsed() -> None:
    env = {"PREFETCHER_IMAGES__STATS_COLLECT_PERIOD": "1m30s"}
    assert config.load(env=env).images.stats_collect_period == 90.0


@pytest.mark.parametrize(("text", "size"), [("32GiB", 32 * 1024**3), ("500MB", 500_000_000)])
def test_sizes_accept_units(text: str, size: int) -> None:
    env = {"PREFETCHER_RUNTIME__MAX_STORE_BYTES": text}
    assert config.load(env=env).runtime.max_store_bytes == size


def test_from_toml_reads_text_like_a_file() -> None:
    settings = config.from_toml("[images]\nsnapshotter = 'containerd'\n", env={})
    assert settings.images.snapshotter == "containerd"


def test_dump_round_trips_through_load(tmp_path: Path) -> None:
    env = {
        "PREFETCHER_IMAGES__IMAGE_PULL_PROGRESS_TIMEOUT": "1m30s",
        "PREFETCHER_IMAGES__PINNED_IMAGES": "pause:3.9",
        "PREFETCHER_IMAGES__REGISTRY__MIRRORS": '{"docker.io": ["https://mirror.gcr.io"]}',
        "PREFETCHER_RUNTIME__MAX_STORE_BYTES": "10GiB",
    }
    settings = config.load(env=env)
    text = config.dump_toml(settings, redact=False)
    assert 'image_pull_progress_timeout = "1m30s"' in text
    again = config.load(write(tmp_path / "dump.toml", text), env={})
    assert again == settings
