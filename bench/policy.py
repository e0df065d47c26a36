#!/usr/bin/env python3
"""Network-policy benchmark (root): what Outpost's eBPF programs cost, against no
filter and against nftables rules equivalent to the same policy (a plain rule chain
and a set), at 10, 1,000 and 10,000 rules; and how long a 10,000-rule bundle takes to
swap in, against `nft -f` replacing the same rules, in the same run.

Topology: a network namespace joined to the host by a veth pair. The client (iperf3,
and a request/response loop of 64-byte messages over one TCP connection) runs in a
workload cgroup inside the namespace; the servers run on the host end. Outpost filters
the workload cgroup (cgroup_skb); nftables filters the namespace's output and input
hooks, written the way nftables policies are (established traffic accepted first).
Of the N rules, N-1 allow other destinations and the last allows the benchmark's.

    sudo .venv/bin/python bench/policy.py [--rules 10,1000,10000] [--seconds 3] [--repeat 3]

Prints a Markdown table and writes JSON next to --out (default bench/results/policy.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from policy_net import CGROUP_ROOT, Enforcer, Net, Workload, bundle, workload_yaml  # noqa: E402

IPERF_PORT = 5201
RR_PORT = 5300

RR_CLIENT = r"""
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b'x' * 64
lat = []
for i in range(n + 200):
    t0 = time.perf_counter_ns()
    s.sendall(msg)
    got = 0
    while got < 64:
        got += len(s.recv(64 - got))
    if i >= 200:
        lat.append(time.perf_counter_ns() - t0)
lat.sort()
print(json.dumps({"p50_us": lat[len(lat) // 2] / 1e3, "p99_us": lat[int(len(lat) * 0.99)] / 1e3,
                  "mean_us": sum(lat) / len(lat) / 1e3}))
"""


def rr_server(host: str, port: int, stop: threading.Event) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(16)
    srv.settimeout(0.2)

    def serve(c: socket.socket) -> None:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with c:
            while True:
                data = c.recv(4096)
                if not data:
                    return
                c.sendall(data)

    while not stop.is_set():
        try:
            c, _ = srv.accept()
        except OSError:
            continue
        threading.Thread(target=serve, args=(c,), daemon=True).start()
    srv.close()


def decoys(n: int) -> list[tuple[str, int]]:
    return [(f"172.{16 + i // 65536}.{(i // 256) % 256}.{i % 256}", 10000 + i % 5000) for i in range(n)]


def outpost_bundle(w: Workload, host: str, n: int, version: int = 1, shift: int = 0) -> str:
    rules = [f"{{name: d{i}, direction: egress, cidr: {a}/32, protocol: tcp, ports: {p + shift}}}"
             for i, (a, p) in enumerate(decoys(n - 1))]
    rules.append(f"{{name: bench, direction: egress, cidr: {host}/32, protocol: tcp, ports: \"{IPERF_PORT}-{RR_PORT}\"}}")
    return bundle(name="bench", version=version, workloads=workload_yaml("app", w.rel, rules))


def nft_ruleset(host: str, n: int, kind: str, shift: int = 0) -> str:
    out = ["table inet outpost_bench {"]
    pairs = decoys(n - 1)
    if kind == "set":
        elems = ", ".join(f"{a} . {p + shift}" for a, p in pairs)
        out.append("  set allowed { type ipv4_addr . inet_service; " + (f"elements = {{ {elems} }}" if elems else "") + " }")
    out.append("  chain out { type filter hook output priority 0; policy drop;")
    out.append("    ct state established,related accept")
    if kind == "set":
        out.append("    ip daddr . tcp dport @allowed accept")
    else:
        for a, p in pairs:
            out.append(f"    ip daddr {a} tcp dport {p + shift} accept")
    out.append(f"    ip daddr {host} tcp dport {IPERF_PORT}-{RR_PORT} accept")
    out.append("  }")
    out.append("  chain in { type filter hook input priority 0; policy drop;")
    out.append("    ct state established,related accept")
    out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def nft_load(ns: str, text: str) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".nft", delete=False) as f:
        f.write("flush ruleset\n" + text)
        path = f.name
    t0 = time.perf_counter()
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", path], check=True)
    elapsed = time.perf_counter() - t0
    os.unlink(path)
    return elapsed


def nft_flush(ns: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "flush", "ruleset"], check=True)


CRR_CLIENT = r"""
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lat = []
for i in range(n):
    t0 = time.perf_counter_ns()
    s = socket.create_connection((host, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b'x' * 64)
    got = 0
    while got < 64:
        got += len(s.recv(64 - got))
    s.close()
    lat.append(time.perf_counter_ns() - t0)
lat.sort()
print(json.dumps({"p50_us": lat[len(lat) // 2] / 1e3, "p99_us": lat[int(len(lat) * 0.99)] / 1e3}))
"""


def bpf_ns_per_run() -> tuple[int, int]:
    """Total run time (ns) and runs of Outpost's cgroup programs (kernel.bpf_stats_enabled)."""
    progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout)
    ns = sum(p.get("run_time_ns", 0) for p in progs if str(p.get("name", "")).startswith("outpost_cg_"))
    cnt = sum(p.get("run_cnt", 0) for p in progs if str(p.get("name", "")).startswith("outpost_cg_"))
    return ns, cnt


def measure(w: Workload, host: str, seconds: float, repeat: int, rr_n: int) -> dict:
    tput = []
    for _ in range(repeat):
        p = subprocess.run(w.argv("iperf3", "-c", host, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"),
                           capture_output=True, text=True, timeout=seconds + 30)
        doc = json.loads(p.stdout)
        if "error" in doc:
            raise RuntimeError(f"iperf3: {doc['error']}")
        tput.append(doc["end"]["sum_received"]["bits_per_second"] / 1e9)
    lats = []
    for _ in range(repeat):
        p = subprocess.run(w.argv("python3", "-c", RR_CLIENT, host, str(RR_PORT), str(rr_n)),
                           capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"request/response client: {p.stderr}")
        lats.append(json.loads(p.stdout))
    crr = []
    for _ in range(repeat):
        p = subprocess.run(w.argv("python3", "-c", CRR_CLIENT, host, str(RR_PORT), str(max(rr_n // 5, 200))),
                           capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"connect/request/response client: {p.stderr}")
        crr.append(json.loads(p.stdout))
    return {
        "gbit_s": statistics.median(tput),
        "p50_us": statistics.median(x["p50_us"] for x in lats),
        "p99_us": statistics.median(x["p99_us"] for x in lats),
        "crr_p50_us": statistics.median(x["p50_us"] for x in crr),
        "crr_p99_us": statistics.median(x["p99_us"] for x in crr),
    }


def enforcer(text: str, work: Path) -> Enforcer:
    """`outpost-agent policy enforce` (release build) on `text`, in a fresh directory."""
    d = Path(tempfile.mkdtemp(dir=work))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return Enforcer(REPO / "target" / "release" / "outpost-agent", d, text, port)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", default="10,1000,10000")
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rr", type=int, default=5000, help="request/response round trips per run")
    ap.add_argument("--swaps", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "policy.json"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/policy.py needs root", file=sys.stderr)
        return 2
    sizes = [int(x) for x in a.rules.split(",")]
    # Per-program run time, to report what a packet costs in Outpost's programs.
    stats_before = Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip()
    Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1")
    net = Net(7)
    w = Workload(net, f"outpost-bench-{os.getpid()}/app")
    stop = threading.Event()
    iperf = subprocess.Popen(["iperf3", "-s", "-B", net.host4, "-p", str(IPERF_PORT)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    threading.Thread(target=rr_server, args=(net.host4, RR_PORT, stop), daemon=True).start()
    time.sleep(0.5)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="outpost-bench-"))
    try:
        # The machine's speed drifts (shared cores): every configuration is measured in
        # rounds interleaved with the unfiltered baseline, and compared with the
        # baseline's median of the same rule count.
        for n in sizes:
            runs: dict[str, list[dict]] = {"no filter": [], "outpost (eBPF)": [], "nftables chain": [], "nftables set": []}
            for _ in range(a.repeat):
                runs["no filter"].append(measure(w, net.host4, a.seconds, 1, a.rr))
                agent = enforcer(outpost_bundle(w, net.host4, n), work)
                ns0, cnt0 = bpf_ns_per_run()
                r = measure(w, net.host4, a.seconds, 1, a.rr)
                ns1, cnt1 = bpf_ns_per_run()
                r["ns_per_packet"] = (ns1 - ns0) / max(cnt1 - cnt0, 1)
                runs["outpost (eBPF)"].append(r)
                m = agent.metrics()
                agent.stop()
                agent.detach()  # enforcement is pinned: it outlives the agent until detached
                denied = m.get('outpost_policy_packets_total{verdict="denied"}', 0)
                assert denied == 0, f"the benchmark's own traffic was denied ({denied} packets)"
                for kind in ("chain", "set"):
                    nft_load(net.ns, nft_ruleset(net.host4, n, kind))
                    runs[f"nftables {kind}"].append(measure(w, net.host4, a.seconds, 1, a.rr))
                    nft_flush(net.ns)
            for config, rs in runs.items():
                keys = ("gbit_s", "p50_us", "p99_us", "crr_p50_us", "crr_p99_us", "ns_per_packet")
                row = {"config": config, "rules": n, **{k: statistics.median(r[k] for r in rs) for k in keys if k in rs[0]}}
                rows.append(row)
                print(f"{n} {config}: {row}", file=sys.stderr)
        # Swapping in a 10,000-rule bundle (every rule changed), against nft -f.
        n = 10_000
        agent = enforcer(outpost_bundle(w, net.host4, n, version=1), work)
        flips, totals = [], []
        for i in range(a.swaps):
            ev = agent.swap(outpost_bundle(w, net.host4, n, version=2 + i, shift=(i + 1) * 7))
            assert ev["event"] == "applied", ev
            flips.append(ev["to_flip_ms"])
            totals.append(ev["total_ms"])
        first_apply = agent.lines[0]["to_flip_ms"]
        agent.stop()
        agent.detach()  # enforcement is pinned: it outlives the agent until detached
        nft_times = {}
        for kind in ("chain", "set"):
            ts = [nft_load(net.ns, nft_ruleset(net.host4, n, kind, shift=(i + 1) * 7)) * 1e3 for i in range(a.swaps)]
            nft_flush(net.ns)
            nft_times[kind] = statistics.median(ts)
        swap = {"rules": n, "outpost_to_flip_ms": statistics.median(flips), "outpost_total_ms": statistics.median(totals),
                "outpost_first_apply_ms": first_apply, "nft_chain_ms": nft_times["chain"], "nft_set_ms": nft_times["set"]}
        print(f"swap: {swap}", file=sys.stderr)
    finally:
        Path("/proc/sys/kernel/bpf_stats_enabled").write_text(stats_before)
        stop.set()
        iperf.terminate()
        iperf.wait(10)
        w.close()
        try:
            (CGROUP_ROOT / f"outpost-bench-{os.getpid()}").rmdir()
        except OSError:
            pass
        net.close()

    facts = {"kernel": platform.release(), "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"facts": facts, "rows": rows, "swap": swap}, indent=2) + "\n")
    print(f"\nkernel {facts['kernel']}, {facts['cpus']} CPUs, {facts['when']}; medians of {a.repeat} interleaved rounds "
          f"({a.seconds:g} s iperf3, {a.rr} round trips of 64 bytes); 'vs no filter' against the unfiltered runs of the same rounds\n")
    print("| filter | rules | throughput Gbit/s | vs no filter | p50 µs | p99 µs | p99 added µs | new connection p50 / p99 µs | ns per packet in the programs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b = next(x for x in rows if x["rules"] == r["rules"] and x["config"] == "no filter")
        ns = f"{r['ns_per_packet']:.0f}" if "ns_per_packet" in r else ""
        print(f"| {r['config']} | {r['rules']:,} | {r['gbit_s']:.2f} | {r['gbit_s'] / b['gbit_s']:.3f}× | "
              f"{r['p50_us']:.1f} | {r['p99_us']:.1f} | {r['p99_us'] - b['p99_us']:+.1f} | "
              f"{r['crr_p50_us']:.0f} / {r['crr_p99_us']:.0f} | {ns} |")
    print(f"\nswap in {n:,} rules: Outpost {swap['outpost_to_flip_ms']:.1f} ms to the flip "
          f"({swap['outpost_total_ms']:.1f} ms with the old generation removed; first load "
          f"{swap['outpost_first_apply_ms']:.1f} ms); nft -f replacing the same rules: chain "
          f"{swap['nft_chain_ms']:.1f} ms, set {swap['nft_set_ms']:.1f} ms "
          f"(Outpost / nft set = {swap['outpost_to_flip_ms'] / swap['nft_set_ms']:.2f}×)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
