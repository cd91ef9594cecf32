"""Credentials come from docker ``config.json`` files and Kubernetes pull secrets."""

from __future__ import annotations

import base64
import json
import logging

import pytest

from agent.images.registry import credentials

Credential = credentials.Credential
Keychain = credentials.Keychain


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def config(auths: dict, **extra) -> bytes:
    return json.dumps({"auths": auths, **extra}).encode()


HUB = Credential("hubuser", "hubpass")


@pytest.mark.parametrize(
    "key", ["https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io"]
)
@pytest.mark.parametrize(
    "host", ["docker.io", "index.docker.io", "registry-1.docker.io", "Registry-1.Docker.IO"]
)
def test_docker_hub_credentials_are_found_under_any_of_its_names(key, host):
    keychain = Keychain.from_docker_config_json(
        config({key: {"auth": b64("hubuser:hubpass")}}), "t"
    )
    assert keychain.lookup(host) == HUB


@pytest.mark.parametrize(
    ("key", "host", "found"),
    [
        ("registry.example.com:5000", "registry.example.com:5000", True),
        ("https://registry.example.com:5000", "registry.example.com:5000", True),
        ("http://registry.example.com:5000/v2/", "registry.example.com:5000", True),
        ("registry.example.com:5000", "registry.example.com", False),
        ("registry.example.com", "registry.example.com:5000", False),
        ("Registry.Example.com", "registry.example.com", True),
        ("localhost:5000", "localhost:5000", True),
        ("[::1]:5000", "[::1]:5000", True),
        ("*.azurecr.io", "team.azurecr.io", True),
        ("*.azurecr.io", "a.b.azurecr.io", False),
        ("*.azurecr.io", "azurecr.io", False),
        ("quay.io", "docker.io", False),
    ],
)
def test_hosts_match_exactly_after_scheme_and_path_are_stripped(key, host, found):
    keychain = Keychain.from_docker_config_json(config({key: {"auth": b64("u:p")}}), "t")
    assert (keychain.lookup(host) is not None) is found


def test_an_exact_key_beats_a_wildcard():
    keychain = Keychain.from_docker_config_json(
        config({"*.example.com": {"auth": b64("w:w")}, "a.example.com": {"auth": b64("e:e")}}),
        "t",
    )
    assert keychain.lookup("a.example.com") == Credential("e", "e")
    assert keychain.lookup("b.example.com") == Credential("w", "w")


def test_a_namespace_key_applies_to_its_repositories_first():
    keychain = Keychain.from_docker_config_json(
        config(
            {
                "quay.io": {"auth": b64("all:1")},
                "quay.io/team": {"auth": b64("team:2")},
                "quay.io/team/app": {"auth": b64("app:3")},
            }
        ),
        "t",
    )
    assert keychain.lookup("quay.io", "team/app").username == "app"
    assert keychain.lookup("quay.io", "team/other").username == "team"
    assert keychain.lookup("quay.io", "teammate/x").username == "all"
    assert keychain.lookup("quay.io").username == "all"


def test_a_docker_hub_namespace_key_matches_through_the_aliases():
    keychain = Keychain.from_docker_config_json(
        config({"docker.io/library": {"auth": b64("lib:x")}}), "t"
    )
    assert keychain.lookup("registry-1.docker.io", "library/alpine").username == "lib"
    assert keychain.lookup("registry-1.docker.io", "user/app") is None


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"auth": b64("user:pa:ss")}, Credential("user", "pa:ss")),
        ({"auth": b64("user:pass").rstrip("=")}, Credential("user", "pass")),
        ({"username": "u", "password": "p"}, Credential("u", "p")),
        ({"auth": b64("a:b"), "username": "ignored"}, Credential("a", "b")),
        ({"identitytoken": "refresh"}, Credential(identity_token="refresh")),
        (
            {"auth": b64("<token>:"), "identitytoken": "refresh"},
            Credential("<token>", "", identity_token="refresh"),
        ),
        ({"registrytoken": "bearer"}, Credential(registry_token="bearer")),
        ({"auth": b64("u:p"), "email": "x@example.com"}, Credential("u", "p")),
    ],
)
def test_entries_are_read_from_auth_username_password_and_tokens(entry, expected):
    keychain = Keychain.from_docker_config_json(config({"r.io": entry}), "t")
    assert keychain.lookup("r.io") == expected


def test_an_empty_entry_is_no_credential():
    keychain = Keychain.from_docker_config_json(config({"r.io": {}}), "t")
    assert keychain.lookup("r.io") is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "expected a JSON object"),
        (b'{"auths": []}', '"auths" must be an object'),
        (config({"r.io": "x"}), "auths['r.io'] must be an object"),
        (config({"r.io": {"auth": "!!!"}}), "auths['r.io'].auth is not base64"),
        (config({"r.io": {"auth": b64("nocolon")}}), 'does not decode to "user:password"'),
        (config({"r.io": {"username": 5}}), "auths['r.io'].username must be a string"),
        (config({}, credHelpers=[]), '"credHelpers" must be an object'),
    ],
)
def test_a_malformed_config_is_an_error_naming_its_source(body, problem):
    with pytest.raises(credentials.CredentialsConfigError) as err:
        Keychain.from_docker_config_json(body, "/etc/x/config.json")
    assert "/etc/x/config.json" in str(err.value)
    assert problem in str(err.value)


def test_the_legacy_dockercfg_form_is_read():
    body = json.dumps({"https://r.io": {"auth": b64("u:p"), "email": "e"}})
    assert Keychain.from_docker_config_json(body, "t").lookup("r.io") == Credential("u", "p")


def test_cred_helpers_are_not_run_and_are_warned_about_once_per_host(caplog):
    keychain = Keychain.from_docker_config_json(
        config({"gcr.io": {}}, credHelpers={"gcr.io": "gcloud"}, credsStore="desktop"),
        "/home/u/.docker/config.json",
    )
    with caplog.at_level(logging.WARNING):
        assert keychain.lookup("gcr.io") is None
        assert keychain.lookup("gcr.io") is None
        assert keychain.lookup("docker.io") is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "gcr.io" in messages[0] and "credHelpers 'gcloud'" in messages[0]
    assert "docker.io" in messages[1] and "credsStore 'desktop'" in messages[1]
    assert "/home/u/.docker/config.json" in messages[0]


def test_credentials_in_auths_win_over_a_creds_store():
    keychain = Keychain.from_docker_config_json(
        config({"r.io": {"auth": b64("u:p")}}, credsStore="desktop"), "t"
    )
    assert keychain.lookup("r.io") == Credential("u", "p")


def test_repr_never_shows_secrets():
    cred = Credential("user", "hunter2", identity_token="tok-secret", registry_token="reg-secret")
    for text in (repr(cred), str(cred), repr([cred])):
        assert "user" in text
        assert "hunter2" not in text and "tok-secret" not in text and "reg-secret" not in text
    keychain = Keychain.from_docker_config_json(config({"r.io": {"auth": b64("u:hunter2")}}), "t")
    assert "hunter2" not in repr(keychain)
    assert keychain.keys == ["r.io"]


SECRET_JSON = config({"https://index.docker.io/v1/": {"auth": b64("hubuser:hubpass")}})


@pytest.mark.parametrize(
    "body",
    [
        {".dockerconfigjson": base64.b64encode(SECRET_JSON).decode()},
        {
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": base64.b64encode(SECRET_JSON).decode()},
        },
        {"stringData": {".dockerconfigjson": SECRET_JSON.decode()}},
        {".dockerconfigjson": SECRET_JSON},
        SECRET_JSON,
        SECRET_JSON.decode(),
        {
            ".dockercfg": b64(
                json.dumps({"https://index.docker.io/v1/": {"auth": b64("hubuser:hubpass")}})
            )
        },
    ],
)
def test_a_pull_secret_body_is_read_in_any_of_its_forms(body):
    keychain = Keychain.from_dockerconfigjson_secret(body, "secret ns/pull")
    assert keychain.lookup("registry-1.docker.io") == HUB


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"data": {"other": "x"}}, "has no .dockerconfigjson"),
        ({".dockerconfigjson": "%%%"}, "data[.dockerconfigjson]: not valid base64"),
        ({".dockerconfigjson": b64("{bad")}, "not valid JSON"),
        ({"data": "x"}, "data must be an object"),
    ],
)
def test_a_bad_pull_secret_is_an_error_naming_the_secret(body, problem):
    with pytest.raises(credentials.CredentialsConfigError) as err:
        Keychain.from_dockerconfigjson_secret(body, "secret ns/pull")
    assert "secret ns/pull" in str(err.value)
    assert problem in str(err.value)


def test_merged_keychains_are_asked_in_order():
    first = Keychain.from_docker_config_json(config({"a.io": {"auth": b64("first:1")}}), "s1")
    second = Keychain.from_docker_config_json(
        config({"a.io": {"auth": b64("second:1")}, "b.io": {"auth": b64("second:2")}}), "s2"
    )
    merged = Keychain.merged(first, second)
    assert merged.lookup("a.io").username == "first"
    assert merged.lookup("b.io").username == "second"
    assert merged.lookup("c.io") is None
    assert merged.keys == ["a.io", "b.io"]
    assert merged


def test_the_empty_keychain_knows_nothing():
    assert Keychain.empty().lookup("docker.io") is None
    assert not Keychain.empty()
    assert not Keychain.merged(Keychain.empty(), Keychain.empty())


def test_from_docker_config_reads_a_file(tmp_path):
    file = tmp_path / "config.json"
    file.write_bytes(config({"r.io": {"auth": b64("u:p")}}))
    assert Keychain.from_docker_config(file).lookup("r.io") == Credential("u", "p")
    file.write_text("{")
    with pytest.raises(credentials.CredentialsConfigError, match=str(file)):
        Keychain.from_docker_config(file)


def _files(tmp_path):
    paths = {}
    for name in ("arg", "registry_auth", "docker_config", "home"):
        path = tmp_path / name / "config.json"
        if name == "home":
            path = tmp_path / name / ".docker" / "config.json"
        path.parent.mkdir(parents=True)
        path.write_bytes(config({"r.io": {"auth": b64(f"{name}:x")}}))
        paths[name] = path
    return paths


@pytest.mark.parametrize(
    ("use_arg", "env_keys", "winner"),
    [
        (True, ["REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "HOME"], "arg"),
        (False, ["REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "HOME"], "registry_auth"),
        (False, ["DOCKER_CONFIG", "HOME"], "docker_config"),
        (False, ["HOME"], "home"),
    ],
)
def test_default_keychain_looks_in_docker_and_podman_places_in_order(
    tmp_path, use_arg, env_keys, winner
):
    paths = _files(tmp_path)
    env_all = {
        "REGISTRY_AUTH_FILE": str(paths["registry_auth"]),
        "DOCKER_CONFIG": str(paths["docker_config"].parent),
        "HOME": str(tmp_path / "home"),
    }
    env = {k: env_all[k] for k in env_keys}
    keychain = credentials.default_keychain(str(paths["arg"]) if use_arg else None, env=env)
    assert keychain.lookup("r.io").username == winner


def test_a_missing_default_file_means_no_credentials(tmp_path):
    keychain = credentials.default_keychain(env={"HOME": str(tmp_path)})
    assert keychain.lookup("docker.io") is None
    keychain = credentials.default_keychain(env={"DOCKER_CONFIG": str(tmp_path / "none")})
    assert keychain.lookup("docker.io") is None


def test_a_missing_auth_file_that_was_asked_for_is_an_error(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(credentials.CredentialsConfigError, match=f"auth file {missing}"):
        credentials.default_keychain(str(missing), env={})


def test_a_malformed_default_file_is_an_error_naming_it(tmp_path):
    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker" / "config.json").write_text('{"auths": 1}')
    with pytest.raises(credentials.CredentialsConfigError, match="config.json"):
        credentials.default_keychain(env={"HOME": str(tmp_path)})


@pytest.mark.parametrize(
    ("key", "normalised"),
    [
        ("https://index.docker.io/v1/", "docker.io"),
        ("http://r.io:5000/v2/", "r.io:5000"),
        ("quay.io/team/", "quay.io/team"),
        ("R.IO", "r.io"),
        ("registry-1.docker.io/library", "docker.io/library"),
    ],
)
def test_normalize_key(key, normalised):
    assert credentials.normalize_key(key) == normalised
