"""`prefetcher config default|migrate|check`, run as a user runs them: the real console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

import pytest

from agent import config

SCRIPT = shutil.which("prefetcher") or str(Path(sys.executable).with_name("prefetcher"))

V1 = """\
[agent]
node_name = "node-a"
metrics_port = 9100
image_pull_progress_timeout = "2m"
sync_fs = true
registry_mirrors = { "docker.io" = ["https://mirror.gcr.io"] }
"""


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith("PREFETCHER_") and k not in config.DOWNWARD_ENV
    }
    env.update(extra or {})
    return env


def prefetcher(
    *args: str, stdin: str | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=clean_env(env),
        timeout=60,
        check=False,
    )


def test_default_piped_into_check_succeeds() -> None:
    default = subprocess.Popen(
        [SCRIPT, "config", "default"], stdout=subprocess.PIPE, env=clean_env()
    )
    check = subprocess.run(
        [SCRIPT, "config", "check", "-"],
        stdin=default.stdout,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert default.wait(timeout=60) == 0
    assert check.returncode == 0, check.stderr
    assert check.stderr == ""
    assert check.stdout.startswith("# <stdin> is valid.")
    effective = tomllib.loads(check.stdout)
    assert effective["version"] == 2
    assert effective["images"]["image_pull_progress_timeout"] == "5m0s"


def test_default_prints_a_commented_version_2_file() -> None:
    result = prefetcher("config", "default")
    assert result.returncode == 0
    assert result.stdout == config.default_toml()
    assert "# Cancel a pull when no byte arrived" in result.stdout
    assert 'image_pull_progress_timeout = "5m0s"' in result.stdout
    assert tomllib.loads(result.stdout)["version"] == 2


def test_migrate_prints_a_version_2_file_that_check_accepts(tmp_path: Path) -> None:
    old = tmp_path / "old.toml"
    old.write_text(V1)
    before = (old.read_bytes(), old.stat().st_mtime_ns)

    migrated = prefetcher("config", "migrate", str(old))

    assert migrated.returncode == 0, migrated.stderr
    assert (old.read_bytes(), old.stat().st_mtime_ns) == before  # never rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.toml"]
    assert "#   agent.sync_fs → images.image_pull_with_sync_fs" in migrated.stdout
    assert "hosts.toml" in migrated.stdout
    assert f"{old} was not modified" in migrated.stderr
    data = tomllib.loads(migrated.stdout)
    assert data == {
        "version": 2,
        "images": {
            "image_pull_progress_timeout": "2m",
            "image_pull_with_sync_fs": True,
            "registry": {"mirrors": {"docker.io": ["https://mirror.gcr.io"]}},
        },
        "runtime": {"node_name": "node-a", "metrics_address": ":9100"},
    }

    new = tmp_path / "new.toml"
    new.write_text(migrated.stdout)
    checked = prefetcher("config", "check", str(new))
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr == ""  # version 2: no migration warning
    effective = tomllib.loads(checked.stdout)
    assert effective["images"]["image_pull_progress_timeout"] == "2m0s"
    assert effective["runtime"]["metrics_address"] == ":9100"


def test_migrate_reads_stdin() -> None:
    result = prefetcher("config", "migrate", "-", stdin=V1)
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["images"]["image_pull_with_sync_fs"] is True


def test_migrate_of_a_version_2_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("version = 2\n[images]\nsnapshotter = 'naive'\n")
    result = prefetcher("config", "migrate", str(path))
    assert result.returncode == 0
    assert "already version 2" in result.stderr
    assert tomllib.loads(result.stdout) == {"version": 2, "images": {"snapshotter": "naive"}}


def test_migrate_rejects_an_unknown_version_1_key(tmp_path: Path) -> None:
    old = tmp_path / "old.toml"
    old.write_text("[agent]\nsyncfs = true\n")
    result = prefetcher("config", "migrate", str(old))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"prefetcher config migrate: {old}: unknown key 'agent.syncfs' in a version 1 file; "
        "did you mean 'agent.sync_fs'?\n"
    )


def test_check_of_a_version_1_file_warns_and_shows_the_migrated_config(tmp_path: Path) -> None:
    old = tmp_path / "old.toml"
    old.write_text(V1)
    result = prefetcher("config", "check", str(old))
    assert result.returncode == 0
    warning = [line for line in result.stderr.splitlines() if line]
    assert len(warning) == 1
    assert "agent.sync_fs → images.image_pull_with_sync_fs" in warning[0]
    assert tomllib.loads(result.stdout)["images"]["image_pull_with_sync_fs"] is True


def test_check_rejects_a_typo_with_a_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[images]\nmax_concurent_downloads = 2\n")
    result = prefetcher("config", "check", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "prefetcher config check: invalid configuration: unknown key "
        f"'images.max_concurent_downloads' (from file {path}); "
        "did you mean 'images.max_concurrent_downloads'?\n"
    )


def test_check_rejects_a_bad_value_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[images]\nimage_pull_progress_timeout = "forever"\n')
    result = prefetcher("config", "check", str(path))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert 'images.image_pull_progress_timeout = "forever"' in result.stderr


def test_check_rejects_a_toml_syntax_error_naming_the_line() -> None:
    result = prefetcher("config", "check", "-", stdin="[images\n")
    assert result.returncode == 1
    assert result.stderr.startswith("prefetcher config check: config file <stdin>: invalid TOML")
    assert "line 1" in result.stderr


def test_check_of_a_missing_file_fails(tmp_path: Path) -> None:
    result = prefetcher("config", "check", str(tmp_path / "none.toml"))
    assert result.returncode == 1
    assert (
        result.stderr == f"prefetcher config check: config file {tmp_path}/none.toml: not found\n"
    )


def test_check_applies_the_environment_unless_told_not_to(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[images]\nmax_concurrent_downloads = 5\n")
    env = {"PREFETCHER_IMAGES__MAX_CONCURRENT_DOWNLOADS": "9"}
    with_env = prefetcher("config", "check", str(path), env=env)
    without = prefetcher("config", "check", "--no-env", str(path), env=env)
    assert tomllib.loads(with_env.stdout)["images"]["max_concurrent_downloads"] == 9
    assert tomllib.loads(without.stdout)["images"]["max_concurrent_downloads"] == 5


def test_check_reports_a_bad_environment_variable() -> None:
    env = {"PREFETCHER_IMAGES__MAX_CONCURRENT_DOWNLOADS": "0"}
    result = prefetcher("config", "check", "-", stdin="", env=env)
    assert result.returncode == 1
    assert "(from env PREFETCHER_IMAGES__MAX_CONCURRENT_DOWNLOADS)" in result.stderr


def test_check_redacts_secrets(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "[images.registry]\n"
        'headers = { Authorization = "Bearer s3cr3t", "X-Api-Key" = "k3y", '
        '"User-Agent" = "acme" }\n'
        'mirrors = { "docker.io" = ["https://bob:hunter2@mirror.example.com"] }\n'
    )
    result = prefetcher("config", "check", str(path))
    assert result.returncode == 0, result.stderr
    for secret in ("s3cr3t", "k3y", "hunter2", "bob"):
        assert secret not in result.stdout
    registry = tomllib.loads(result.stdout)["images"]["registry"]
    assert registry["headers"] == {
        "Authorization": "<redacted>",
        "X-Api-Key": "<redacted>",
        "User-Agent": "acme",
    }
    assert registry["mirrors"] == {"docker.io": ["https://<redacted>@mirror.example.com"]}


def test_check_quiet_prints_nothing_when_valid() -> None:
    result = prefetcher("config", "check", "--quiet", "-", stdin="version = 2\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize("args", [["config"], ["config", "check"], ["config", "nope"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert prefetcher(*args).returncode == 2
