from agent.images import snapshots, unpack


def test_the_snapshots_facade_exports_exactly_its_public_names() -> None:
    assert set(snapshots.__all__) == {
        "CAP_OVERLAY_WHITEOUTS", "CAP_REBASE", "LABEL_OWNER", "Info", "Kind", "Mount",
        "NaiveSnapshotter", "OverlaySnapshotter", "Snapshotter", "Usage", "mount_all",
        "syncfs", "unmount",
    }  # fmt: skip
    assert all(hasattr(snapshots, name) for name in snapshots.__all__)


def test_the_unpack_facade_exports_exactly_its_public_names() -> None:
    assert set(unpack.__all__) == {
        "ApplyResult", "UnpackEvent", "Unpacker", "apply", "apply_layer", "open_layer",
    }  # fmt: skip
    assert all(hasattr(unpack, name) for name in unpack.__all__)


def test_both_snapshotters_satisfy_the_protocol(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for cls in (snapshots.OverlaySnapshotter, snapshots.NaiveSnapshotter):
        sn = cls(tmp_path / cls.__name__)
        assert isinstance(sn, snapshots.Snapshotter)
        sn.close()
