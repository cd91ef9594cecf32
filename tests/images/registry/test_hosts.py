"""Registry hosts come from containerd's ``hosts.toml`` directory layout."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.images.registry import hosts

ALL = frozenset({"pull", "resolve", "push"})


def write(root: Path, directory: str, text: str) -> Path:
    (root / directory).mkdir(parents=True, exist_ok=True)
    file = root / directory / "hosts.toml"
    file.write_text(text)
    return file


@pytest.mark.parametrize(
    ("domain", "scheme", "host", "fallback", "skip_verify"),
    [
        ("docker.io", "https", "registry-1.docker.io", False, False),
        ("quay.io", "https", "quay.io", False, False),
        ("registry.example.com:5000", "https", "registry.example.com:5000", False, False),
        ("localhost", "https", "localhost", True, True),
        ("localhost:5000", "https", "localhost:5000", True, True),
        ("127.0.0.1:5000", "https", "127.0.0.1:5000", True, True),
        ("127.1.2.3:5000", "https", "127.1.2.3:5000", True, True),
        ("[::1]:5000", "https", "[::1]:5000", True, True),
        ("localhost:443", "https", "localhost:443", False, False),
        ("localhost:80", "http", "localhost:80", False, False),
        ("10.0.0.1:5000", "https", "10.0.0.1:5000", False, False),
    ],
)
def test_without_configuration_the_upstream_is_the_domain_itself(
    domain, scheme, host, fallback, skip_verify
):
    [only] = hosts.RegistryHosts().for_domain(domain)
    assert (only.scheme, only.host, only.path) == (scheme, host, "/v2")
    assert only.capabilities == ALL
    assert only.fallback_plain_http is fallback
    assert only.skip_verify is skip_verify
    assert only.namespace == ""


def test_plain_http_uses_http_for_every_host(tmp_path):
    write(tmp_path, "docker.io", '[host."https://mirror.local"]\n')
    found = hosts.RegistryHosts(tmp_path, plain_http=True).for_domain("docker.io")
    assert [h.scheme for h in found] == ["http", "http"]
    assert not any(h.fallback_plain_http for h in found)
    [local] = hosts.RegistryHosts(plain_http=True).for_domain("127.0.0.1:5000")
    assert local.base_url == "http://127.0.0.1:5000/v2"


def test_global_skip_verify_and_headers_apply_to_every_host(tmp_path):
    write(tmp_path, "quay.io", '[host."https://m"]\n  [host."https://m".header]\n  x-a = "own"\n')
    found = hosts.RegistryHosts(tmp_path, skip_verify=True, headers={"x-a": "g", "x-b": "g"})
    mirror, upstream = found.for_domain("quay.io")
    assert mirror.skip_verify and upstream.skip_verify
    assert mirror.headers == {"x-a": "own", "x-b": "g"}
    assert upstream.headers == {"x-a": "g", "x-b": "g"}


def test_mirrors_come_first_in_file_order_then_the_server(tmp_path):
    write(
        tmp_path,
        "docker.io",
        """
server = "https://registry-1.docker.io"

[host."https://public-mirror.example.com"]
  capabilities = ["pull"]
[host."https://docker-mirror.internal"]
  capabilities = ["pull", "resolve"]
[host."http://a-plain-mirror:5000"]
""",
    )
    found = hosts.RegistryHosts(tmp_path).for_domain("docker.io")
    assert [h.base_url for h in found] == [
        "https://public-mirror.example.com/v2",
        "https://docker-mirror.internal/v2",
        "http://a-plain-mirror:5000/v2",
        "https://registry-1.docker.io/v2",
    ]
    assert [h.capabilities for h in found] == [
        frozenset({"pull"}),
        frozenset({"pull", "resolve"}),
        ALL,
        ALL,
    ]
    assert [h.can("resolve") for h in found] == [False, True, True, True]
    assert [h.namespace for h in found] == ["docker.io"] * 3 + [""]


def test_a_file_without_server_falls_back_to_the_upstream(tmp_path):
    write(tmp_path, "docker.io", 'capabilities = ["pull"]\n[host."https://mirror"]\n')
    mirror, upstream = hosts.RegistryHosts(tmp_path).for_domain("docker.io")
    assert mirror.host == "mirror" and mirror.capabilities == ALL
    assert upstream.base_url == "https://registry-1.docker.io/v2"
    assert upstream.capabilities == frozenset({"pull"})  # top-level keys configure the server


def test_a_loopback_upstream_keeps_its_fallback_under_a_hosts_file(tmp_path):
    write(tmp_path, "localhost:5000", 'skip_verify = false\n[host."https://m"]\n')
    _, upstream = hosts.RegistryHosts(tmp_path).for_domain("localhost:5000")
    assert upstream.host == "localhost:5000" and upstream.fallback_plain_http


def test_server_docker_io_means_the_docker_hub_api_host(tmp_path):
    write(tmp_path, "docker.io", 'server = "https://docker.io"\n')
    [upstream] = hosts.RegistryHosts(tmp_path).for_domain("docker.io")
    assert upstream.host == "registry-1.docker.io"
    assert upstream.namespace == ""


def test_the_default_directory_applies_to_unconfigured_domains(tmp_path):
    write(tmp_path, "_default", '[host."https://registry.example.com"]\ncapabilities=["pull"]\n')
    write(tmp_path, "quay.io", 'server = "https://quay.example"\n')
    mirror, upstream = hosts.RegistryHosts(tmp_path).for_domain("ghcr.io")
    assert mirror.host == "registry.example.com" and mirror.namespace == "ghcr.io"
    assert upstream.host == "ghcr.io" and upstream.namespace == ""
    [quay] = hosts.RegistryHosts(tmp_path).for_domain("quay.io")
    assert quay.host == "quay.example"
    assert quay.namespace == "quay.io"


def test_server_only_in_default_replaces_the_upstream_everywhere(tmp_path):
    write(tmp_path, "_default", 'server = "https://registry.example.com"\n')
    [only] = hosts.RegistryHosts(tmp_path).for_domain("ghcr.io")
    assert only.url("a/b", "manifests", "1") == (
        "https://registry.example.com/v2/a/b/manifests/1?ns=ghcr.io"
    )


@pytest.mark.parametrize("directory", ["registry.io_5000_", "registry.io:5000"])
def test_a_domain_with_a_port_is_found_in_either_directory_spelling(tmp_path, directory):
    write(tmp_path, directory, 'server = "http://registry.io:5000"\n')
    [only] = hosts.RegistryHosts(tmp_path).for_domain("registry.io:5000")
    assert only.base_url == "http://registry.io:5000/v2"


def test_the_underscore_spelling_wins_over_the_colon_one(tmp_path):
    write(tmp_path, "registry.io:5000", 'server = "https://colon"\n')
    write(tmp_path, "registry.io_5000_", 'server = "https://underscore"\n')
    [only] = hosts.RegistryHosts(tmp_path).for_domain("registry.io:5000")
    assert only.host == "underscore"


def test_a_missing_config_directory_means_no_configuration(tmp_path):
    [only] = hosts.RegistryHosts(tmp_path / "nowhere").for_domain("quay.io")
    assert only.base_url == "https://quay.io/v2"


def test_tls_settings_are_read_and_relative_paths_are_taken_from_the_file(tmp_path):
    file = write(
        tmp_path,
        "r.io",
        """
ca = "top.crt"
[host."https://test-1.registry"]
  ca = ["/etc/certs/test-1-ca.pem", "special.pem"]
  client = [["/etc/certs/client.cert", "client.key"], ["/etc/certs/client.pem", ""]]
  skip_verify = true
[host."https://test-2.registry"]
  client = "client.pem"
[host."https://test-3.registry"]
  client = ["/c1.pem", "c2.pem"]
""",
    )
    base = str(file.parent)
    one, two, three, upstream = hosts.RegistryHosts(tmp_path).for_domain("r.io")
    assert one.ca_files == ("/etc/certs/test-1-ca.pem", f"{base}/special.pem")
    assert one.client_certs == (
        ("/etc/certs/client.cert", f"{base}/client.key"),
        ("/etc/certs/client.pem", ""),
    )
    assert one.skip_verify is True
    assert two.client_certs == ((f"{base}/client.pem", ""),)
    assert two.skip_verify is False
    assert three.client_certs == (("/c1.pem", ""), (f"{base}/c2.pem", ""))
    assert upstream.ca_files == (f"{base}/top.crt",)


def test_headers_take_strings_or_lists(tmp_path):
    write(
        tmp_path,
        "r.io",
        '[host."https://m"]\n  [host."https://m".header]\n'
        '    x-custom-1 = "custom header"\n    x-custom-2 = ["a", "b"]\n',
    )
    mirror, upstream = hosts.RegistryHosts(tmp_path).for_domain("r.io")
    assert mirror.headers == {"x-custom-1": "custom header", "x-custom-2": "a, b"}
    assert upstream.headers == {}


@pytest.mark.parametrize(
    ("url", "override", "base"),
    [
        ("https://mirror-bak.registry/us", False, "https://mirror-bak.registry/us/v2"),
        ("https://mirror.registry/v2", False, "https://mirror.registry/v2"),
        ("https://mirror.registry/", False, "https://mirror.registry/v2"),
        ("mirror.registry", False, "https://mirror.registry/v2"),
        ("https://nc.registry/v2/upstream", True, "https://nc.registry/v2/upstream"),
        ("https://nc.registry/api//x/", True, "https://nc.registry/api/x"),
        ("https://nc.registry", True, "https://nc.registry"),
    ],
)
def test_the_api_root_gets_v2_unless_override_path(tmp_path, url, override, base):
    override_line = "override_path = true\n" if override else ""
    write(tmp_path, "r.io", f'[host."{url}"]\n{override_line}')
    mirror, _ = hosts.RegistryHosts(tmp_path).for_domain("r.io")
    assert mirror.base_url == base
    assert mirror.override_path is override


@pytest.mark.parametrize(
    ("host", "args", "url"),
    [
        (
            hosts.RegistryHost("https", "registry-1.docker.io"),
            ("library/alpine", "manifests", "3.20"),
            "https://registry-1.docker.io/v2/library/alpine/manifests/3.20",
        ),
        (
            hosts.RegistryHost("https", "r.io"),
            ("a/b", "blobs", "sha256:" + "a" * 64),
            "https://r.io/v2/a/b/blobs/sha256:" + "a" * 64,
        ),
        (hosts.RegistryHost("http", "[::1]:5000"), ("",), "http://[::1]:5000/v2/"),
        (
            hosts.RegistryHost("https", "m", path="/up", override_path=True),
            ("x", "manifests", "t"),
            "https://m/up/x/manifests/t",
        ),
        (
            hosts.RegistryHost("https", "m", path="/", override_path=True),
            ("x", "tags", "list"),
            "https://m/x/tags/list",
        ),
        (
            hosts.RegistryHost("https", "m", namespace="localhost:5000"),
            ("x", "manifests", "t"),
            "https://m/v2/x/manifests/t?ns=localhost:5000",
        ),
    ],
)
def test_url_builds_the_distribution_api_path(host, args, url):
    assert host.url(*args) == url


def test_as_plain_http_switches_the_scheme_and_ends_the_fallback():
    [local] = hosts.RegistryHosts().for_domain("127.0.0.1:5000")
    plain = local.as_plain_http()
    assert plain.base_url == "http://127.0.0.1:5000/v2"
    assert not plain.fallback_plain_http


def test_dial_timeout_and_proxy_are_read(tmp_path):
    write(tmp_path, "r.io", 'proxy = "http://p:8080"\n[host."https://m"]\ndial_timeout = "1.5s"\n')
    mirror, upstream = hosts.RegistryHosts(tmp_path).for_domain("r.io")
    assert mirror.dial_timeout == 1.5 and mirror.proxy == ""
    assert upstream.dial_timeout is None and upstream.proxy == "http://p:8080"


def test_docker_certs_d_files_are_used_when_there_is_no_hosts_toml(tmp_path):
    directory = tmp_path / "r.io:5000"
    directory.mkdir()
    for name in ("ca.crt", "client.cert", "client.key"):
        (directory / name).write_text("x")
    [only] = hosts.RegistryHosts(tmp_path).for_domain("r.io:5000")
    assert only.base_url == "https://r.io:5000/v2"
    assert only.ca_files == (str(directory / "ca.crt"),)
    assert only.client_certs == ((str(directory / "client.cert"), str(directory / "client.key")),)


def test_a_client_cert_without_its_key_is_an_error(tmp_path):
    directory = tmp_path / "r.io"
    directory.mkdir()
    (directory / "client.cert").write_text("x")
    with pytest.raises(hosts.HostsConfigError, match="client.key"):
        hosts.RegistryHosts(tmp_path).for_domain("r.io")


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("server = [", "invalid TOML"),
        ("server = 5", '"server"'),
        ('server = "ftp://x"', "server"),
        ('[host."https://m"]\ncapabilities = ["pull", "fly"]', 'host."https://m".capabilities'),
        ('[host."https://m"]\ncapabilities = "pull"', 'host."https://m".capabilities'),
        ('capabilities = ["teleport"]', "capabilities: unknown capability 'teleport'"),
        ('[host."https://m"]\nskip_verify = "yes"', 'host."https://m".skip_verify'),
        ('[host."https://m"]\noverride_path = 1', 'host."https://m".override_path'),
        ('[host."https://m"]\nca = 5', 'host."https://m".ca'),
        ('[host."https://m"]\nclient = [["a"]]', 'host."https://m".client'),
        ('[host."https://m"]\nclient = 3', 'host."https://m".client'),
        ('[host."https://m"]\nheader = { x = 1 }', 'host."https://m".header.x'),
        ('[host."https://m"]\ndial_timeout = "soon"', 'host."https://m".dial_timeout'),
        ('host = "https://m"', '"host"'),
        ('[host."https://m"]\nproxy = 1', 'host."https://m".proxy'),
    ],
)
def test_a_bad_hosts_toml_is_an_error_naming_the_file_and_the_key(tmp_path, text, names):
    file = write(tmp_path, "r.io", text)
    with pytest.raises(hosts.HostsConfigError) as err:
        hosts.RegistryHosts(tmp_path).for_domain("r.io")
    assert str(file) in str(err.value)
    assert names in str(err.value)


def test_unknown_keys_are_ignored_with_a_warning(tmp_path, caplog):
    file = write(tmp_path, "r.io", 'sever = "typo"\n[host."https://m"]\ncapabilites = []\n')
    with caplog.at_level(logging.WARNING):
        found = hosts.RegistryHosts(tmp_path).for_domain("r.io")
    assert [h.host for h in found] == ["m", "r.io"]
    assert f"{file}: ignoring unknown key sever" in caplog.text
    assert 'host."https://m".capabilites' in caplog.text


def test_edits_apply_without_a_restart(tmp_path):
    registry_hosts = hosts.RegistryHosts(tmp_path)
    assert registry_hosts.for_domain("r.io")[0].host == "r.io"
    write(tmp_path, "r.io", 'server = "https://other"\n')
    assert registry_hosts.for_domain("r.io")[0].host == "other"


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("localhost", True),
        ("LOCALHOST:5000", True),
        ("127.0.0.1", True),
        ("127.255.0.9:80", True),
        ("[::1]:5000", True),
        ("[::1]", True),
        ("registry.localhost:5000", True),
        ("128.0.0.1", False),
        ("[::2]:5000", False),
        ("localhost.example.com", False),
        ("docker.io", False),
    ],
)
def test_loopback_domains_are_localhost_127_0_0_0_8_and_ipv6_one(domain, expected):
    assert hosts.is_loopback(domain) is expected


@pytest.mark.parametrize(
    ("domain", "parts"),
    [
        ("r.io", ("r.io", "")),
        ("r.io:5000", ("r.io", "5000")),
        ("[::1]:5000", ("::1", "5000")),
        ("[::1]", ("::1", "")),
    ],
)
def test_split_host_port(domain, parts):
    assert hosts.split_host_port(domain) == parts
