"""The kvgate chart's `batchStore`: the Files and Batches API's store as a volume, rendered by the
real helm binary (the `helm` fixture of test_charts.py) and the config it renders loaded with the
gateway's own loader."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from kvgate.settings import settings_from_dict
from tests import test_charts
from tests.test_charts import KVGATE, NS, by_kind, one, render_chart

helm = test_charts.helm  # the real helm binary, as test_charts.py runs it
MOUNT = "/var/lib/kvgate/batch"


def render(helm: Any, *sets: str) -> list[dict[str, Any]]:
    args = [arg for value in sets for arg in ("--set", value)]
    return render_chart(helm, KVGATE, *args)


def pod_of(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The Deployment's strategy, the batch-store volume (or {}) and the container's mounts."""
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    return deployment["spec"]["strategy"], volumes.get("batch-store", {}), mounts


def batch_config(docs: list[dict[str, Any]]) -> Any:
    data = yaml.safe_load(one(docs, "ConfigMap", "-config")["data"]["config.yaml"])
    return settings_from_dict(data).gateway.batch


def test_off_by_default(helm) -> None:
    docs = render(helm)
    strategy, volume, mounts = pod_of(docs)
    assert not volume and "batch-store" not in mounts and not by_kind(docs, "PersistentVolumeClaim")
    assert batch_config(docs).state_dir == ""  # the API answers 404
    assert strategy["type"] == "RollingUpdate"


def test_an_emptydir_store_for_one_replica(helm) -> None:
    docs = render(helm, "batchStore.enabled=true", "replicaCount=1")
    strategy, volume, mounts = pod_of(docs)
    assert volume["emptyDir"] == {"sizeLimit": "1Gi"} and mounts["batch-store"] == MOUNT
    config = batch_config(docs)
    assert (config.state_dir, config.journal_mode) == (MOUNT, "wal")
    assert not by_kind(docs, "PersistentVolumeClaim") and strategy["type"] == "RollingUpdate"


def test_a_shared_claim_for_several_replicas(helm) -> None:
    docs = render(helm, "batchStore.enabled=true", "replicaCount=3",
                  "batchStore.mountPath=/data/batch",
                  "batchStore.persistentVolumeClaim.enabled=true",
                  "batchStore.persistentVolumeClaim.size=50Gi",
                  "batchStore.persistentVolumeClaim.storageClass=filestore-rwx",
                  "batchStore.persistentVolumeClaim.accessModes={ReadWriteMany}")
    claim = one(docs, "PersistentVolumeClaim", "-batch-store")
    assert claim["metadata"]["namespace"] == NS
    assert claim["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "storageClassName": "filestore-rwx",
                             "resources": {"requests": {"storage": "50Gi"}}}
    strategy, volume, mounts = pod_of(docs)
    assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}
    assert mounts["batch-store"] == "/data/batch"
    config = batch_config(docs)
    # A ReadWriteMany volume is a network file system: SQLite's rollback journal, not WAL.
    assert (config.state_dir, config.journal_mode) == ("/data/batch", "delete")
    assert strategy["type"] == "RollingUpdate" and one(docs, "Deployment")["spec"]["replicas"] == 3


def test_a_readwriteonce_claim_for_one_replica_recreates(helm) -> None:
    docs = render(helm, "batchStore.enabled=true", "replicaCount=1",
                  "batchStore.persistentVolumeClaim.enabled=true",
                  "batchStore.persistentVolumeClaim.keep=false")
    claim = one(docs, "PersistentVolumeClaim", "-batch-store")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and "annotations" not in claim["metadata"]
    assert "storageClassName" not in claim["spec"]  # the cluster's default class
    strategy, volume, _ = pod_of(docs)
    assert strategy == {"type": "Recreate"}
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert batch_config(docs).journal_mode == "wal"


def test_an_existing_claim_and_an_explicit_journal_mode(helm) -> None:
    docs = render(helm, "batchStore.enabled=true", "replicaCount=2",
                  "batchStore.persistentVolumeClaim.enabled=true",
                  "batchStore.persistentVolumeClaim.existingClaim=team-batches",
                  "batchStore.persistentVolumeClaim.accessModes={ReadWriteMany}",
                  "batchStore.journalMode=wal")
    assert not by_kind(docs, "PersistentVolumeClaim")
    _, volume, _ = pod_of(docs)
    assert volume["persistentVolumeClaim"] == {"claimName": "team-batches"}
    assert batch_config(docs).journal_mode == "wal"


def test_extra_config_tunes_the_api_beside_the_store(helm) -> None:
    docs = render(helm, "batchStore.enabled=true", "replicaCount=1",
                  "extraConfig.batch.concurrency=8", "extraConfig.batch.singleModel=false")
    config = batch_config(docs)
    assert (config.state_dir, config.concurrency, config.single_model) == (MOUNT, 8, False)


INVALID = [
    (["batchStore.enabled=true", "replicaCount=2"],
     "each replica would have a store of its own"),
    (["batchStore.enabled=true", "replicaCount=2", "batchStore.persistentVolumeClaim.enabled=true"],
     "accessModes must include ReadWriteMany when replicaCount > 1"),
    (["batchStore.enabled=true", "replicaCount=2", "batchStore.persistentVolumeClaim.enabled=true",
      "batchStore.persistentVolumeClaim.accessModes={ReadWriteOnce,ReadOnlyMany}"],
     "accessModes must include ReadWriteMany"),
    (["batchStore.journalMode=memory"], "journalMode"),
    (["batchStore.persistentVolumeClaim.accessModes={ReadWriteSometimes}"], "accessModes"),
    (["batchStore.persistentVolumeClaim.size=lots"], "size"),
    (["batchStore.mountPath=relative/path"], "mountPath"),
    (["batchStore.pvc.enabled=true"], "pvc"),
]


@pytest.mark.parametrize("sets, message", INVALID, ids=[m for _, m in INVALID])
def test_a_store_the_replicas_could_not_share_fails_at_install_time(helm, sets, message) -> None:
    args = [arg for value in sets for arg in ("--set", value)]
    proc = helm("template", "kvgate", str(KVGATE), *args, check=False)
    assert proc.returncode != 0, f"{sets} rendered"
    assert message in proc.stderr, proc.stderr
