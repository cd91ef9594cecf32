from agent.images import backends


def test_the_backends_facade_exports_exactly_its_public_names() -> None:
    assert set(backends.__all__) == {
        "Backend", "LocalBackend", "RuntimeInfo", "Unpacked", "Unpacking", "open_store",
    }  # fmt: skip
    assert all(hasattr(backends, name) for name in backends.__all__)
