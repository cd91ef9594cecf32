from agent.images import cri


def test_the_cri_facade_exports_exactly_its_public_names() -> None:
    assert set(cri.__all__) == {"CriBackend", "NO_BYTE_PROGRESS"}
    assert all(hasattr(cri, name) for name in cri.__all__)
