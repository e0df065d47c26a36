#!/usr/bin/env python3
"""One fresh python-tuf client refresh, the reference the agent is compared with.

    py_refresh.py --metadata-dir DIR --metadata-url URL --root FILE [--record FILE --label L --run N]

Starts from an empty DIR trusting FILE (like `outpost-agent tuf-client init`), then runs
tuf.ngclient.Updater(...).refresh() against URL: root chain, timestamp, snapshot and
top-level targets, all verified. With --record, appends the in-process time of the
bootstrap + refresh (without interpreter start-up and imports) as a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tuf.ngclient import Updater


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metadata-dir", required=True)
    ap.add_argument("--metadata-url", required=True)
    ap.add_argument("--root", required=True, help="trusted root metadata file")
    ap.add_argument("--record", help="JSON-lines file to append the in-process timing to")
    ap.add_argument("--label", default="python_tuf_refresh_inprocess")
    ap.add_argument("--run", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    os.makedirs(args.metadata_dir, exist_ok=True)
    with open(args.root, "rb") as f:
        root_bytes = f.read()
    updater = Updater(args.metadata_dir, args.metadata_url, bootstrap=root_bytes)
    updater.refresh()
    elapsed = time.perf_counter() - t0

    if args.record:
        with open(args.record, "a", encoding="utf-8") as f:
            f.write(json.dumps({"label": args.label, "run": args.run, "wall_s": elapsed, "rc": 0}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
