"""Extract the ray.io/v1 schemas that tests/deploy/test_manifests.py validates against.

The source is KubeRay's published CRDs (``ray-operator/config/crd/bases/ray.io_<plural>.yaml``
of https://github.com/ray-project/kuberay, Apache-2.0). From each CRD only the ``v1`` version's
``openAPIV3Schema`` is kept, minus what never validates anything: the ``description`` texts
and the ``status`` subtree (the operator writes status; a manifest has none). Everything else,
``x-kubernetes-*`` keys included, is kept as published; the test, not this file, turns unknown
fields into errors.

    python tests/deploy/kuberay_schema/extract.py --git-dir KUBERAY.git --ref v1.7.0
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
CRDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}
VERSION = "v1"


def strip(node: Any) -> Any:
    """``node`` without ``description`` keywords (a property named description stays)."""
    if isinstance(node, dict):
        return {
            key: strip(value)
            for key, value in node.items()
            if not (key == "description" and isinstance(value, str))
        }
    if isinstance(node, list):
        return [strip(item) for item in node]
    return node


def openapi_schema(crd: dict[str, Any], version: str = VERSION) -> dict[str, Any]:
    (found,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strip(found["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    return schema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--git-dir", required=True, help="a clone (or bare mirror) of kuberay")
    parser.add_argument("--ref", default="v1.7.0", help="the release tag to read")
    args = parser.parse_args()
    for kind, plural in CRDS.items():
        path = f"ray-operator/config/crd/bases/ray.io_{plural}.yaml"
        text = subprocess.run(
            ["git", "--git-dir", args.git_dir, "show", f"{args.ref}:{path}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        data = json.dumps(openapi_schema(yaml.safe_load(text)), separators=(",", ":"))
        # mtime=0: the same CRD gives the same bytes, so a re-run shows no git diff.
        out = HERE / f"{kind}.{VERSION}.json.gz"
        out.write_bytes(gzip.compress(data.encode(), compresslevel=9, mtime=0))
        print(f"{out.name}: {len(data):,} bytes of JSON, {out.stat().st_size:,} gzipped")


if __name__ == "__main__":
    main()
