#!/usr/bin/env python3
"""Write a static TUF repository with many targets, using python-tuf's Metadata API.

    make_repo.py --out DIR [--targets 10000]

DIR/metadata/ receives 1.root.json (and root.json), 1.targets.json, 1.snapshot.json and
timestamp.json (consistent snapshots, one ed25519 key per top-level role, generated
fresh and not kept). The target files themselves are not written: a metadata refresh
never fetches them. Target paths look like the outpost firmware layout,
firmware/<class>/<version>/image.bin, with the outpost custom metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from datetime import datetime, timedelta, timezone

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    MetaFile,
    Metadata,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

HW_CLASSES = ("rpi4", "rpi5", "x86-gw", "imx8")


def build(out: str, n_targets: int) -> dict[str, int]:
    meta_dir = os.path.join(out, "metadata")
    os.makedirs(meta_dir, exist_ok=True)
    now = datetime.now(timezone.utc).replace(microsecond=0)

    signers = {role: CryptoSigner.generate_ed25519() for role in ("root", "targets", "snapshot", "timestamp")}

    root = Metadata(Root(expires=now + timedelta(days=365), consistent_snapshot=True))
    for role, signer in signers.items():
        root.signed.add_key(signer.public_key, role)

    targets = Metadata(Targets(expires=now + timedelta(days=90)))
    for i in range(n_targets):
        hw = HW_CLASSES[i % len(HW_CLASSES)]
        version = f"1.{i // 100}.{i % 100}"
        path = f"firmware/{hw}/{version}/image.bin"
        digest = hashlib.sha256(path.encode()).hexdigest()
        tf = TargetFile(
            length=8 * 1024 * 1024 + i,
            hashes={"sha256": digest},
            path=path,
            unrecognized_fields={
                "custom": {
                    "outpost": {
                        "kind": "firmware",
                        "version": version,
                        "hardware_class": hw,
                        "expected_measurement": {"sha256": digest},
                    }
                }
            },
        )
        targets.signed.targets[path] = tf

    snapshot = Metadata(Snapshot(expires=now + timedelta(days=7)))
    snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)

    timestamp = Metadata(Timestamp(expires=now + timedelta(days=1)))
    timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)

    ser = JSONSerializer(compact=True)
    sizes: dict[str, int] = {}

    def write(md: Metadata, role: str, name: str) -> None:
        md.sign(signers[role])
        path = os.path.join(meta_dir, name)
        md.to_file(path, serializer=ser)
        sizes[name] = os.path.getsize(path)

    write(root, "root", f"{root.signed.version}.root.json")
    write(root, "root", "root.json")
    write(targets, "targets", f"{targets.signed.version}.targets.json")
    write(snapshot, "snapshot", f"{snapshot.signed.version}.snapshot.json")
    write(timestamp, "timestamp", "timestamp.json")
    return sizes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="repository directory to create")
    ap.add_argument("--targets", type=int, default=10_000, help="number of target entries (default 10000)")
    args = ap.parse_args()
    sizes = build(args.out, args.targets)
    for name, size in sizes.items():
        print(f"{name}\t{size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
