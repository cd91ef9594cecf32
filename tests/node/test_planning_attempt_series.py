"""Which attempt series the agent starts and cancels, after changes and restarts."""

from __future__ import annotations

from agent.node import reconciling
from agent.node.reconciling import Entry, Outcome, plan


def entry(name: str, **fields: object) -> Entry:
    return reconciling.parse_entry({"name": name, "image": f"registry.test/{name}:1",
                                    "owners": [], **fields})


def test_every_entry_starts_a_series_after_a_restart() -> None:
    wanted = {"a": entry("a"), "b": entry("b")}
    assert plan(wanted, {}, {}, set(), now=0, failed_retry_interval=0).start == ("a", "b")


def test_a_running_series_of_the_same_version_is_left_alone() -> None:
    wanted = {"a": entry("a")}
    result = plan(wanted, {"a": wanted["a"].key}, {}, set(), now=0, failed_retry_interval=0)
    assert result.start == () and result.cancel == ()


def test_a_removed_entry_is_cancelled_and_a_changed_one_restarted() -> None:
    old = entry("a")
    new = entry("a", digest="sha256:" + "1" * 64)
    result = plan({"a": new}, {"a": old.key, "gone": entry("gone").key}, {}, set(), now=0,
                  failed_retry_interval=0)
    assert result.cancel == ("a", "gone")
    assert result.start == ("a",)


def test_a_ready_entry_is_pulled_again_only_when_pinned_and_gone_from_the_store() -> None:
    plain, pinned = entry("a"), entry("b", pinned=True)
    outcomes = {"a": Outcome(plain.key, True), "b": Outcome(pinned.key, True)}
    wanted = {"a": plain, "b": pinned}
    assert plan(wanted, {}, outcomes, set(), now=0, failed_retry_interval=0).start == ("b",)
    present = {plain.reference, pinned.reference}
    assert plan(wanted, {}, outcomes, present, now=0, failed_retry_interval=0).start == ()


def test_a_failed_entry_gets_a_new_series_after_the_retry_interval() -> None:
    a = entry("a")
    outcomes = {"a": Outcome(a.key, False, "Unauthorized", at=100.0)}
    early = plan({"a": a}, {}, outcomes, set(), now=160.0, failed_retry_interval=300)
    assert early.start == () and early.wake_in == 240.0
    due = plan({"a": a}, {}, outcomes, set(), now=400.0, failed_retry_interval=300)
    assert due.start == ("a",)


def test_an_invalid_reference_is_never_retried_without_a_spec_change() -> None:
    a = entry("a")
    outcomes = {"a": Outcome(a.key, False, "InvalidReference", at=0.0)}
    result = plan({"a": a}, {}, outcomes, set(), now=1e6, failed_retry_interval=300,
                  hopeless=["InvalidReference"])
    assert result.start == () and result.wake_in is None


def test_a_failed_entry_whose_spec_changed_starts_at_once() -> None:
    a = entry("a")
    outcomes = {"a": Outcome(a.key, False, "Unauthorized", at=0.0)}
    changed = entry("a", pullSecrets=["ipf-123-regcred"])
    assert plan({"a": changed}, {}, outcomes, set(), now=1.0,
                failed_retry_interval=0).start == ("a",)


def test_entries_pull_the_resolved_digest_and_carry_their_limits() -> None:
    e = reconciling.parse_entry({
        "name": "nginx", "image": "docker.io/library/nginx:1.27", "owners": [
            {"namespace": "team", "name": "web", "uid": "u1"}],
        "digest": "sha256:" + "a" * 64, "pullSecrets": ["b", "a", "a"],
        "progressTimeout": "1m30s", "timeoutSeconds": 600, "backoffLimit": 0,
        "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
    assert e.reference == "docker.io/library/nginx@sha256:" + "a" * 64
    assert e.pull_secrets == ("a", "b")
    assert (e.progress_timeout, e.timeout_seconds, e.backoff_limit) == (90.0, 600.0, 0)
    assert e.owners == ("team/web",)
    bare = reconciling.parse_entry({"name": "x", "image": "docker.io/library/x:1"})
    assert bare.reference == "docker.io/library/x:1"
    assert (bare.progress_timeout, bare.timeout_seconds, bare.backoff_limit) == (None, None, 3)


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [reconciling.backoff(n, 10, 60) for n in range(1, 6)] == [10, 20, 40, 60, 60]
