"""Review regression: a restart after a spec change must not read the prefetch as Complete
(its own module: it runs its own operators, not the module's shared one)."""

from __future__ import annotations

import time
from pathlib import Path

from tests.kube.cluster import Cluster
from tests.operator.conftest import entries_of, ipf, prefetch, report, running_operator


def test_a_restarted_operator_does_not_read_a_changed_spec_as_complete(
        cluster: Cluster, agent_daemonset_file: Path, tmp_path: Path) -> None:
    selector = {"matchLabels": {"pool": "rs"}}
    cluster.add_node("rs-a", {"pool": "rs"})
    with running_operator(cluster, tmp_path, agent_daemonset_file):
        cluster.apply(prefetch("rs", "default", images=["nginx:1.27"], nodeSelector=selector))
        cluster.wait_for(lambda: entries_of(cluster, "rs-a", "rs"))
        report(cluster, "rs-a", "Ready")
        cluster.wait_for(lambda: ipf(cluster, "rs", "default")["status"].get("phase")
                         == "Complete")
        cluster.apply(prefetch("rs", "default", images=["nginx:1.27", "redis:7"],
                               nodeSelector=selector))
        cluster.wait_for(lambda: len(entries_of(cluster, "rs-a", "rs")) == 2)
        report(cluster, "rs-a", "Downloading", bytesDone=1)
        cluster.wait_for(lambda: ipf(cluster, "rs", "default")["status"].get("phase")
                         == "Progressing")
        time.sleep(1)
    (tmp_path / "2").mkdir()
    with running_operator(cluster, tmp_path / "2", agent_daemonset_file):
        time.sleep(3)
        assert ipf(cluster, "rs", "default")["status"]["phase"] == "Progressing"
