"""docs/configuration.md and `config default` describe exactly the model, so they cannot drift."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from agent import config

DOC = Path(__file__).parent.parent / "docs" / "configuration.md"
OPTIONS = list(config.iter_options())


def test_documentation_tables_are_generated_from_the_model() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert config.render_docs(text) == text, (
        "docs/configuration.md is out of date: run `python -m agent.config docs/configuration.md`"
    )


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.dotted)
def test_every_option_is_documented_with_its_default_and_env_var(option: config.Option) -> None:
    text = DOC.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith(f"| `{option.dotted}` |"))
    assert f"`{option.env}`" in row
    assert option.default_text.replace("|", "\\|") in row


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.dotted)
def test_every_option_has_a_description_stating_its_default(option: config.Option) -> None:
    assert len(option.description) > 30
    assert "Default" in option.description or option.dotted == "version"


def test_every_version_1_key_is_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    for key, (target, _) in config.V1_KEYS.items():
        assert f"| `{key}` | `{target}` |" in text


def test_version_1_keys_all_land_on_real_options() -> None:
    dotted = {o.dotted for o in OPTIONS}
    assert {target for target, _ in config.V1_KEYS.values()} <= dotted


def test_default_file_holds_every_option_with_its_default() -> None:
    text = config.default_toml()
    data = tomllib.loads(text)
    for option in OPTIONS:
        if option.computed:  # machine-dependent: shown commented out
            assert f"# {option.path[-1]} = " in text
            continue
        node = data
        for part in option.path:
            node = node[part]
        assert node == tomllib.loads(f"x = {option.default_text}")["x"]


def test_default_file_is_commented_and_loads_as_the_defaults() -> None:
    text = config.default_toml()
    for option in OPTIONS:
        assert option.env in text
    assert config.from_toml(text, env={}).model_dump() == config.validate({}).model_dump()


def test_env_var_names_follow_the_nesting() -> None:
    assert config.env_var_name("images.registry.config_path") == (
        "PREFETCHER_IMAGES__REGISTRY__CONFIG_PATH"
    )
