#!/usr/bin/env python3
"""Timing and reporting helpers for bench/bench.sh (standard library only).

    measure.py time --record FILE --label L [--run N] [--log FILE] -- CMD [ARG ...]
        Run CMD once under GNU time (/usr/bin/time -v); append one JSON line
        {"label", "run", "wall_s", "maxrss_kib", "rc"} to FILE. Exits with CMD's code.
        Records with the same label and run are summed (wall) / maxed (RSS) in reports,
        so a run made of several commands (init, then refresh) is recorded per command.

    measure.py report --record FILE --out MARKDOWN [--fact KEY=VALUE ...]
        Print the results as Markdown and write them to MARKDOWN.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

GNU_TIME = "/usr/bin/time"
MIB = 1024 * 1024


# --------------------------------------------------------------------------- time
def cmd_time(args: argparse.Namespace) -> int:
    cmd = args.cmd
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("measure.py time: no command given", file=sys.stderr)
        return 2
    if not os.access(GNU_TIME, os.X_OK):
        print(f"measure.py: {GNU_TIME} not found (Debian package 'time'; run scripts/setup.sh)", file=sys.stderr)
        return 2

    with tempfile.NamedTemporaryFile("r", prefix="gnutime.", suffix=".txt", delete=False) as tf:
        time_out = tf.name
    log = open(args.log, "ab") if args.log else None
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [GNU_TIME, "-v", "-o", time_out, *cmd],
            stdin=subprocess.DEVNULL,
            stdout=log if log else None,
            stderr=subprocess.STDOUT if log else None,
        )
        wall = time.perf_counter() - t0
        with open(time_out, encoding="utf-8", errors="replace") as f:
            report = f.read()
    finally:
        if log:
            log.close()
        os.unlink(time_out)

    m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", report)
    maxrss = int(m.group(1)) if m else None
    rec = {"label": args.label, "run": args.run, "wall_s": wall, "maxrss_kib": maxrss, "rc": proc.returncode}
    with open(args.record, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    return proc.returncode


# --------------------------------------------------------------------------- report
def load(record: str) -> dict[str, list[dict]]:
    """label -> list of per-run aggregates {wall_s, maxrss_kib, rc}."""
    per: dict[tuple[str, int], dict] = {}
    with open(record, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            key = (r["label"], int(r.get("run", 0)))
            agg = per.setdefault(key, {"wall_s": 0.0, "maxrss_kib": None, "rc": 0})
            agg["wall_s"] += float(r["wall_s"])
            if r.get("maxrss_kib") is not None:
                agg["maxrss_kib"] = max(agg["maxrss_kib"] or 0, int(r["maxrss_kib"]))
            agg["rc"] = agg["rc"] or int(r.get("rc", 0))
    out: dict[str, list[dict]] = defaultdict(list)
    for (label, _run), agg in sorted(per.items()):
        out[label].append(agg)
    return out


def med(runs: list[dict]) -> float:
    return statistics.median(r["wall_s"] for r in runs)


def peak_mib(runs: list[dict]) -> float | None:
    vals = [r["maxrss_kib"] for r in runs if r["maxrss_kib"] is not None]
    return max(vals) / 1024 if vals else None


def fmt_s(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def cmd_report(args: argparse.Namespace) -> int:
    facts = dict(kv.split("=", 1) for kv in args.fact)
    data = load(args.record)
    failed = [label for label, runs in data.items() if any(r["rc"] for r in runs)]
    if failed:
        print(f"measure.py report: failed runs recorded for {', '.join(failed)}", file=sys.stderr)
        return 1

    rows: list[tuple[str, str, str, str]] = []
    details: list[str] = []

    image_bytes = int(facts.get("image_bytes", "0"))
    dl, ossl, curl = data.get("agent_download"), data.get("openssl_sha256"), data.get("curl_download")
    if dl and ossl and image_bytes:
        dl_t, ossl_t = med(dl), med(ossl)
        dl_mibs, ossl_mibs = image_bytes / MIB / dl_t, image_bytes / MIB / ossl_t
        size = f"{image_bytes / MIB / 1024:.0f} GiB" if image_bytes % (1024 * MIB) == 0 else f"{image_bytes / MIB:.0f} MiB"
        rows.append((
            f"download + verify a {size} firmware image over loopback (`outpost-agent tuf-client download`, median of {len(dl)})",
            f"{dl_mibs:.0f} MiB/s ({fmt_s(dl_t)})",
            f"`openssl dgst -sha256` on the same file: {ossl_mibs:.0f} MiB/s ({fmt_s(ossl_t)})",
            f"**{dl_mibs / ossl_mibs:.2f}** (agent ÷ openssl throughput; higher is better, 1.0 = hashing speed)",
        ))
        dd = data.get("dd_direct")
        if dd:
            dd_mibs = image_bytes / MIB / med(dd)
            lower, which = min((ossl_mibs, "hashing"), (dd_mibs, "disk"))
            rows.append((
                "same download against the lower of the two limits measured in this run",
                f"agent: {dl_mibs:.0f} MiB/s",
                f"`dd oflag=direct conv=fsync` of the same bytes to the same disk: {dd_mibs:.0f} MiB/s; lower limit: {which}, {lower:.0f} MiB/s",
                f"**{dl_mibs / lower:.2f}** (agent ÷ lower limit)",
            ))
            details.append("dd runs (s): " + ", ".join(f"{r['wall_s']:.2f}" for r in dd))
        if curl:
            curl_t = med(curl)
            curl_mibs = image_bytes / MIB / curl_t
            rows.append((
                "same download with `curl -o FILE` (no verification: transport + write through the page cache)",
                f"agent: {dl_mibs:.0f} MiB/s",
                f"curl: {curl_mibs:.0f} MiB/s ({fmt_s(curl_t)})",
                f"{dl_mibs / curl_mibs:.2f} (agent ÷ curl throughput)",
            ))
        rss = peak_mib(dl)
        rows.append((
            f"agent peak RSS during that download (GNU time, max of {len(dl)})",
            f"{rss:.1f} MiB" if rss is not None else "n/a",
            f"image size: {image_bytes / MIB:.0f} MiB",
            f"{rss / (image_bytes / MIB):.3f} of the image size" if rss is not None else "",
        ))
        details.append("download runs (s): " + ", ".join(f"{r['wall_s']:.2f}" for r in dl))
        details.append("openssl runs (s): " + ", ".join(f"{r['wall_s']:.2f}" for r in ossl))
        if curl:
            details.append("curl runs (s): " + ", ".join(f"{r['wall_s']:.2f}" for r in curl))
    pub = data.get("publish_image")
    if pub and image_bytes:
        details.append(
            f"`outpost release publish --server` of the image (hash, Sigstore signature, upload + server re-signing): {fmt_s(med(pub))}"
            f" ({image_bytes / MIB / med(pub):.0f} MiB/s)"
            + (f", peak RSS {rss:.1f} MiB" if (rss := peak_mib(pub)) is not None else "")
        )

    ag, py, py_in = data.get("agent_init_refresh"), data.get("python_tuf_refresh"), data.get("python_tuf_refresh_inprocess")
    n_targets = facts.get("targets_count", "?")
    if ag and py:
        ag_t, py_t = med(ag), med(py)
        ref = f"python-tuf {facts.get('python_tuf', '')} `Updater.refresh()`: {fmt_s(py_t)} (process)".replace("  ", " ")
        if py_in:
            ref += f", {fmt_s(med(py_in))} in-process"
        rows.append((
            f"fresh `tuf-client init` + `refresh`, {n_targets} targets"
            f" ({facts.get('targets_json_bytes', '?')} bytes of targets.json; median of {len(ag)})",
            f"{fmt_s(ag_t)}",
            ref,
            f"**{ag_t / py_t:.2f}** (agent ÷ python-tuf time; lower is better)",
        ))
        rss_a, rss_p = peak_mib(ag), peak_mib(py)
        if rss_a is not None and rss_p is not None:
            rows.append((f"peak RSS during that refresh", f"{rss_a:.1f} MiB", f"python-tuf: {rss_p:.1f} MiB", f"{rss_a / rss_p:.2f}"))
        details.append("agent init+refresh runs (s): " + ", ".join(f"{r['wall_s']:.3f}" for r in ag))
        details.append("python-tuf refresh runs (s, process): " + ", ".join(f"{r['wall_s']:.3f}" for r in py))
        if py_in:
            details.append("python-tuf refresh runs (s, in-process): " + ", ".join(f"{r['wall_s']:.3f}" for r in py_in))

    if not rows:
        print("measure.py report: nothing to report", file=sys.stderr)
        return 1

    md = ["# Benchmarks", ""]
    md.append(f"Generated by `bash bench/bench.sh` on {facts.get('date', '?')}; all numbers from one run on one machine.")
    md.append("")
    md.append("| machine | |")
    md.append("|---|---|")
    for key, label in (("cpu", "CPU"), ("nproc", "nproc"), ("mem", "memory"), ("kernel", "kernel"),
                       ("os", "OS"), ("rustc", "rustc"), ("openssl", "openssl"), ("python_tuf", "python-tuf"),
                       ("commit", "outpost commit"), ("binaries", "binaries")):
        if facts.get(key):
            md.append(f"| {label} | {facts[key]} |")
    md.append("")
    md.append("| benchmark | outpost | reference | ratio |")
    md.append("|---|---|---|---|")
    for r in rows:
        md.append("| " + " | ".join(r) + " |")
    md.append("")
    md.append("Raw figures:")
    md.append("")
    for d in details:
        md.append(f"- {d}")
    md.append("")
    md.append("Method: see [bench/README.md](../bench/README.md). Server, agent and the references run")
    md.append("on the same machine over loopback (`127.0.0.1`) with the source files in the page cache,")
    md.append("so the figures measure CPU and local disk paths, not a network. The agent writes its full")
    md.append("1 MiB buffers with `O_DIRECT` (from its aligned buffer pool to the disk, no copy into new")
    md.append("page-cache pages) and renames the verified file into place; `tuf-client download` does not")
    md.append("fsync (device installs through `run` do, see the issue-3 figures). curl writes through the")
    md.append("page cache. Run-to-run variation on this 2-core virtual machine is large, hence the medians.")
    text = "\n".join(md) + "\n"
    if args.out and os.path.exists(args.out):
        # Keep what follows: the sections other benchmarks maintain (each between its
        # <!-- name:begin --> and <!-- name:end --> markers) and any text between them.
        with open(args.out, encoding="utf-8") as f:
            old = f.read()
        first = re.search(r"<!-- [a-z0-9_-]+:begin -->", old)
        if first:
            text += "\n" + old[first.start():].rstrip("\n") + "\n"

    sys.stdout.write(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("time", help="run and time one command")
    t.add_argument("--record", required=True)
    t.add_argument("--label", required=True)
    t.add_argument("--run", type=int, default=0)
    t.add_argument("--log", help="append the command's stdout+stderr here instead of the terminal")
    t.add_argument("cmd", nargs=argparse.REMAINDER)
    r = sub.add_parser("report", help="print and write the Markdown report")
    r.add_argument("--record", required=True)
    r.add_argument("--out")
    r.add_argument("--fact", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    return cmd_time(args) if args.command == "time" else cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
