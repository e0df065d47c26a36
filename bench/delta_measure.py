#!/usr/bin/env python3
"""Measurements and report for bench/delta.sh (standard library only).

    delta_measure.py codecs --record FILE --work DIR --delta-bin BIN --levels "19 3"
                            --runs N --xdelta "-9,-9 -B IMG" --bsdiff 0|1
                            --pair NAME:OLD:NEW [--pair ...]
        For each image pair: make one patch with every tool (Outpost `delta make` at each
        level, xdelta3 with each option set, bsdiff), then apply each patch N times,
        interleaved. Every applied output must hash to NEW's sha256 (else exit 1).
        Wall time and peak RSS of each process come from GNU time; one JSON line each.

    delta_measure.py resume --record FILE --work DIR --agent-bin BIN --server-url URL
                            --trusted-root ROOT --image IMG --rate BYTES_PER_S
                            --trials N --seed S
        A real outpost-agent (`run --once`, bandwidth-capped) downloads the published
        image through a counting TCP proxy on 127.0.0.1: once uninterrupted, then N times
        SIGKILLed when the proxy has passed r bytes of the image (r uniform in [0, length),
        seeded) and restarted. Records the bytes each run fetched.

    delta_measure.py report --record FILE --out MARKDOWN
        Print the Markdown section and put it between <!-- delta:begin --> and
        <!-- delta:end --> in MARKDOWN (appended when the markers are absent).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GNU_TIME = "/usr/bin/time"
MIB = 1024 * 1024
BEGIN = "<!-- delta:begin -->"
END = "<!-- delta:end -->"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(4 * MIB)
            if not b:
                return h.hexdigest()
            h.update(b)


def append(record: str, obj: dict) -> None:
    with open(record, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")


def timed(cmd: list[str], log: str | None, timeout: float | None = None) -> dict:
    """Runs cmd under GNU time; wall seconds, peak RSS (KiB), exit code, stdout."""
    with tempfile.NamedTemporaryFile("r", prefix="gnutime.", delete=False) as tf:
        tpath = tf.name
    try:
        with open(log or os.devnull, "ab") as lf:
            lf.write(("$ " + " ".join(cmd) + "\n").encode())
            lf.flush()
            os.sync()  # flush earlier runs' writes so their write-back does not land in this run
            t0 = time.perf_counter()
            # Own process group, so a timeout stops the tool itself, not only GNU time.
            p = subprocess.Popen([GNU_TIME, "-f", "%M", "-o", tpath, *cmd], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=lf, start_new_session=True)
            try:
                stdout, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
                return {"rc": None, "wall_s": time.perf_counter() - t0, "timeout": True, "stdout": ""}
            wall = time.perf_counter() - t0
        rss = None
        with open(tpath, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip().isdigit():
                    rss = int(line.strip())
        return {"rc": p.returncode, "wall_s": wall, "maxrss_kib": rss, "stdout": stdout.decode(errors="replace")}
    finally:
        os.unlink(tpath)


# --------------------------------------------------------------------------- codecs
def tools(args, old_size: int, new_size: int) -> list[dict]:
    out = []
    for lvl in args.levels.split():
        out.append({
            "tool": f"outpost zstd -{lvl}", "family": "outpost", "level": int(lvl),
            "make": lambda o, n, p, lvl=lvl: [args.delta_bin, "make", o, n, p, lvl],
            "apply": lambda o, p, r: [args.delta_bin, "apply", o, p, r],
        })
    img = str(max(old_size, new_size))
    for opts in [v.strip() for v in args.xdelta.split(",") if v.strip()]:
        o = [] if opts == "default" else opts.replace("IMG", img).split()
        label = "xdelta3 " + ("(defaults: -3, 64 MiB source window)" if opts == "default"
                              else opts.replace("IMG", "<image size>"))
        out.append({
            "tool": label, "family": "xdelta3", "options": opts,
            "make": lambda a, n, p, o=o: ["xdelta3", "-e", "-f", *o, "-s", a, n, p],
            # -B must cover the window the encoder used, or decoding is slow or fails.
            "apply": lambda a, p, r, o=o: ["xdelta3", "-d", "-f", *[x for i, x in enumerate(o) if x == "-B" or (i and o[i - 1] == "-B")], "-s", a, p, r],
        })
    if args.bsdiff == "1":
        out.append({
            "tool": "bsdiff", "family": "bsdiff",
            "make": lambda a, n, p: ["bsdiff", a, n, p],
            "apply": lambda a, p, r: ["bspatch", a, r, p],
        })
    return out


def cmd_codecs(args) -> int:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for spec in args.pair:
        name, old, new = spec.split(":", 2)
        old_size, new_size = os.path.getsize(old), os.path.getsize(new)
        want = sha256_file(new)
        append(args.record, {"kind": "pair", "pair": name, "old_bytes": old_size, "new_bytes": new_size,
                             "new_sha256": want, "old_sha256": sha256_file(old),
                             "identical_4k_blocks": identical_blocks(old, new)})
        ts = tools(args, old_size, new_size)
        made = []
        for i, t in enumerate(ts):
            patch = str(work / f"{name}.{i}.patch")
            print(f"  {name}: make  {t['tool']}", file=sys.stderr, flush=True)
            timeout = args.bsdiff_timeout if t["family"] == "bsdiff" else None
            r = timed(t["make"](old, new, patch), args.log, timeout)
            rec = {"kind": "make", "pair": name, "tool": t["tool"], "family": t["family"],
                   "wall_s": r["wall_s"], "maxrss_kib": r.get("maxrss_kib"), "rc": r["rc"]}
            if r.get("timeout"):
                rec["timeout"] = True
                print(f"    gave up after {r['wall_s']:.0f} s", file=sys.stderr)
            elif r["rc"] != 0:
                if t["family"] != "bsdiff":
                    print(f"delta_measure: {t['tool']} make failed (exit {r['rc']}; see {args.log})", file=sys.stderr)
                    return 1
                # bsdiff is optional: record the failure (e.g. out of memory) and go on.
                rec["failed"] = True
                print(f"    {t['tool']} failed (exit {r['rc']}); left out", file=sys.stderr)
            else:
                rec["patch_bytes"] = os.path.getsize(patch)
                if t["family"] == "outpost":
                    rec["internal_s"] = json.loads(r["stdout"].strip().splitlines()[-1])["seconds"]
                made.append((t, patch))
            append(args.record, rec)
        for run in range(1, args.runs + 1):
            # For scale: what any apply costs at least (write B), and hashing B.
            out = str(work / f"{name}.out")
            for label, cmd in (("cp", ["cp", new, out]), ("sha256", ["openssl", "dgst", "-sha256", new])):
                r = timed(cmd, args.log)
                append(args.record, {"kind": "ref", "pair": name, "what": label, "run": run, "wall_s": r["wall_s"],
                                     "rc": r["rc"]})
            if os.path.exists(out):
                os.unlink(out)
            for t, patch in made:
                out = str(work / f"{name}.out")
                print(f"  {name}: apply {t['tool']} (run {run}/{args.runs})", file=sys.stderr, flush=True)
                r = timed(t["apply"](old, patch, out), args.log)
                if r["rc"] != 0:
                    print(f"delta_measure: {t['tool']} apply failed (exit {r['rc']}; see {args.log})", file=sys.stderr)
                    return 1
                got = sha256_file(out)
                rec = {"kind": "apply", "pair": name, "tool": t["tool"], "family": t["family"], "run": run,
                       "wall_s": r["wall_s"], "maxrss_kib": r["maxrss_kib"], "sha256": got, "ok": got == want}
                if t["family"] == "outpost":
                    j = json.loads(r["stdout"].strip().splitlines()[-1])
                    rec["internal_s"] = j["seconds"]
                    rec["ok"] = rec["ok"] and j["sha256"] == want
                append(args.record, rec)
                os.unlink(out)
                if not rec["ok"]:
                    print(f"delta_measure: {t['tool']} reconstructed {name} with sha256 {got}, expected {want}",
                          file=sys.stderr)
                    return 1
    return 0


def identical_blocks(a: str, b: str, bs: int = 4096) -> float:
    """Share of B's 4 KiB blocks equal to A's block at the same offset (how in-place the change is)."""
    same = total = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(bs * 256), fb.read(bs * 256)
            if not y:
                break
            for i in range(0, len(y), bs):
                total += 1
                same += x[i:i + bs] == y[i:i + bs]
    return same / total if total else 1.0


# --------------------------------------------------------------------------- resume
class CountingProxy:
    """TCP proxy 127.0.0.1:port -> upstream that counts bytes and can cut a target download.

    Counts all server->client bytes, and separately the body bytes of responses to
    `GET /targets/...` requests. With `cut_at` set, it stops forwarding once that many
    target body bytes have passed (exactly), and sets `cut`.
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.lock = threading.Lock()
        self.reset()
        self.closing = False
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self, cut_at: int | None = None, on_cut=None) -> None:
        with self.lock:
            self.down_total = 0      # server -> client, all bytes
            self.up_total = 0        # client -> server
            self.target_body = 0     # body bytes of target responses
            self.target_requests: list[str] = []
            self.cut_at = cut_at
            self.on_cut = on_cut
            self.cut = threading.Event()

    def _accept(self) -> None:
        while not self.closing:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                s = socket.create_connection(self.upstream)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns += [c, s]
            threading.Thread(target=self._pump, args=(c, s), daemon=True).start()

    def _pump(self, c: socket.socket, s: socket.socket) -> None:
        state = {"target": False, "in_body": False, "hdr": b""}
        held = False
        try:
            while True:
                r, _, _ = select.select([c, s], [], [], 0.5)
                if self.closing:
                    return
                if c in r:
                    data = c.recv(65536)
                    if not data:
                        return
                    with self.lock:
                        self.up_total += len(data)
                    m = re.match(rb"(GET|HEAD|POST|PUT) (\S+)", data)
                    if m:  # a new request on this connection
                        is_target = m.group(1) == b"GET" and b"/targets/" in m.group(2)
                        state.update(target=is_target, in_body=False, hdr=b"")
                        if is_target:
                            rng = re.search(rb"(?im)^range:\s*(\S+)", data)
                            with self.lock:
                                self.target_requests.append(
                                    m.group(2).decode() + (f" (Range {rng.group(1).decode()})" if rng else ""))
                    s.sendall(data)
                if s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    send = data
                    with self.lock:
                        if state["target"]:
                            body = b""
                            if state["in_body"]:
                                body = data
                            else:
                                state["hdr"] += data
                                k = state["hdr"].find(b"\r\n\r\n")
                                if k >= 0:
                                    state["in_body"] = True
                                    body = state["hdr"][k + 4:]
                            head_len = len(data) - len(body)
                            if self.cut_at is not None and self.target_body + len(body) >= self.cut_at:
                                keep = self.cut_at - self.target_body
                                send = data[:head_len + keep]
                                self.target_body += keep
                                self.down_total += len(send)
                                if send:
                                    c.sendall(send)
                                if self.on_cut:
                                    self.on_cut()
                                self.cut.set()
                                held = True
                                return  # hold the connection open: nothing more reaches the agent
                            self.target_body += len(body)
                        self.down_total += len(send)
                    c.sendall(send)
        except OSError:
            return
        finally:
            if not held:  # a cut connection stays open until close(), after the agent is dead
                for x in (c, s):
                    try:
                        x.close()
                    except OSError:
                        pass

    def close(self) -> None:
        self.closing = True
        self.lsock.close()
        with self.lock:
            for x in self.conns:
                try:
                    x.close()
                except OSError:
                    pass

    def snapshot(self) -> dict:
        with self.lock:
            return {"down_total": self.down_total, "up_total": self.up_total, "target_body": self.target_body,
                    "target_requests": list(self.target_requests)}


def write_device(dirpath: Path, proxy_url: str, trusted_root: str, rate: int, name: str) -> Path:
    dirpath.mkdir(parents=True, exist_ok=True)
    cfg = dirpath / "agent.toml"
    cfg.write_text(
        f'server_url = "{proxy_url}"\n'
        'hardware_class = "rpi4"\n'
        'state_dir = "state"\n'
        f'trusted_root = "{trusted_root}"\n'
        f'device_id = "{name}"\n'
        "[install]\n"
        f"bandwidth_limit_bytes_per_sec = {rate}\n", encoding="utf-8")
    return cfg


def agent_run(agent_bin: str, cfg: Path, log: Path, proxy: CountingProxy, cut_at: int | None,
              timeout: float = 600) -> dict:
    """One `outpost-agent run --once`; SIGKILLed when the proxy cuts."""
    with open(log, "ab") as lf:
        lf.write(f"--- run (cut_at={cut_at})\n".encode())
        lf.flush()
        holder: list[subprocess.Popen] = []

        def kill():
            if holder:
                try:
                    holder[0].send_signal(signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proxy.reset(cut_at, kill)
        p = subprocess.Popen([agent_bin, "--config", str(cfg), "--log-level", "info", "--json", "run", "--once"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=lf)
        holder.append(p)
        t0 = time.perf_counter()
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            raise SystemExit(f"delta_measure: agent run did not finish in {timeout} s (log {log})")
        wall = time.perf_counter() - t0
    snap = proxy.snapshot()
    snap.update(rc=p.returncode, wall_s=wall, killed=proxy.cut.is_set(),
                results=[json.loads(line) for line in out.decode(errors="replace").splitlines() if line.startswith("{")])
    return snap


def last_download_line(log: Path) -> dict:
    found = {}
    for line in log.read_text(errors="replace").splitlines():
        if "download verified" in line:
            found = {k: int(v) for k, v in re.findall(r"\b(resumed_from|received|attempts)=(\d+)", line)}
    return found


def active_slot_sha(state: Path) -> str | None:
    env = state / "boot" / "bootenv.json"
    try:
        active = json.loads(env.read_text())["active"]
    except (OSError, ValueError, KeyError):
        return None
    slot = state / "boot" / f"slot-{str(active).lower()}.img"
    return sha256_file(slot) if slot.exists() else None


def cmd_resume(args) -> int:
    image_len = os.path.getsize(args.image)
    want = sha256_file(args.image)
    host, port = re.match(r"http://([^:/]+):(\d+)", args.server_url).groups()
    proxy = CountingProxy((host, int(port)))
    proxy_url = f"http://127.0.0.1:{proxy.port}"
    work = Path(args.work)
    rng = random.Random(args.seed)
    append(args.record, {"kind": "resume_setup", "image_bytes": image_len, "rate": args.rate, "seed": args.seed,
                         "trials": args.trials, "checkpoint_bytes": 4 * MIB})

    def check_done(run: dict, dev: Path, what: str) -> None:
        committed = [r for r in run["results"] if r.get("result") == "committed"]
        sha = active_slot_sha(dev / "state")
        if run["rc"] != 0 or not committed or sha != want:
            raise SystemExit(f"delta_measure: {what} did not end committed with the image active "
                             f"(rc {run['rc']}, results {run['results']}, active sha {sha}); see {dev}/agent.log")

    try:
        dev = work / "baseline"
        cfg = write_device(dev, proxy_url, args.trusted_root, args.rate, "bench-resume-baseline")
        print("  baseline: one uninterrupted download", file=sys.stderr, flush=True)
        base = agent_run(args.agent_bin, cfg, dev / "agent.log", proxy, None)
        check_done(base, dev, "the uninterrupted run")
        append(args.record, {"kind": "resume_baseline", "down_total": base["down_total"],
                             "target_body": base["target_body"], "wall_s": base["wall_s"],
                             "requests": base["target_requests"]})
        for i in range(1, args.trials + 1):
            r = rng.randrange(image_len)
            dev = work / f"trial-{i}"
            cfg = write_device(dev, proxy_url, args.trusted_root, args.rate, f"bench-resume-{i}")
            print(f"  trial {i}/{args.trials}: SIGKILL after {r} bytes of the image, then restart",
                  file=sys.stderr, flush=True)
            first = agent_run(args.agent_bin, cfg, dev / "agent.log", proxy, r)
            if not first["killed"]:
                raise SystemExit(f"delta_measure: trial {i}: the agent finished before the cut at {r} (see {dev})")
            second = agent_run(args.agent_bin, cfg, dev / "agent.log", proxy, None)
            check_done(second, dev, f"trial {i}'s restarted run")
            dl = last_download_line(dev / "agent.log")
            append(args.record, {"kind": "resume_trial", "trial": i, "cut_at": r,
                                 "first_down_total": first["down_total"], "first_target_body": first["target_body"],
                                 "second_down_total": second["down_total"],
                                 "second_target_body": second["target_body"],
                                 "resumed_from": dl.get("resumed_from"), "second_wall_s": second["wall_s"],
                                 "requests": first["target_requests"] + second["target_requests"]})
    finally:
        proxy.close()
    return 0


# --------------------------------------------------------------------------- report
def load(record: str) -> list[dict]:
    with open(record, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


def size(n: int) -> str:
    if n >= 10 * MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.0f} KiB"


def fmt_s(s: float) -> str:
    return f"{s:.2f}" if s < 100 else f"{s:.0f}"


def render(recs: list[dict]) -> str:
    facts = {r["key"]: r["value"] for r in recs if r["kind"] == "fact"}
    changed = [r for r in recs if r["kind"] == "changed"]
    pairs = [r for r in recs if r["kind"] == "pair"]
    L: list[str] = []
    w = L.append
    w(BEGIN)
    w("## Delta updates: Outpost's zstd patch against xdelta3 and bsdiff")
    w("")
    w(f"Generated by `bash bench/delta.sh` on {facts.get('date', '?')}; all numbers from one run on one machine "
      f"({facts.get('cpu', '?')}, {facts.get('nproc', '?')} cores, {facts.get('mem', '?')}; "
      f"outpost commit {facts.get('commit', '?')}; `{facts.get('delta_bin', 'delta')}`; load average "
      f"{facts.get('loadavg_start', '?')} at the start, {facts.get('loadavg_end', '?')} at the end). "
      f"xdelta3 {facts.get('xdelta3', '?')}, bsdiff {facts.get('bsdiff', 'not run')}, "
      f"e2fsprogs {facts.get('e2fsprogs', '?')}, squashfs-tools {facts.get('squashfs_tools', '?')}.")
    w("")
    if pairs:
        w(f"**Image pairs.** {facts.get('packages', '?')} real Debian bookworm packages "
          f"({mib(int(facts.get('deb_bytes', 0)))} of .debs: libc, systemd, coreutils, bash, util-linux, apt, "
          f"Python 3.11, perl-base, OpenSSL, curl, GnuTLS, Kerberos, ...) unpacked with `dpkg-deb -x` into tree A "
          f"({mib(int(facts.get('tree_a_bytes', 0)))}, {facts.get('tree_a_files', '?')} paths). Tree B is the same "
          f"set after an update in which {len(changed)} binary packages changed version: A has the older build "
          f"the archive still serves, B the newest ({facts.get('changed_files', '?')} paths differ):")
        w("")
        w("| package | version in A | version in B |")
        w("|---|---|---|")
        for c in changed:
            w(f"| {c['package']} | {c['a']} | {c['b']} |")
        w("")
        w(f"Images: **ext4**, {facts.get('ext4_mib', '?')} MiB (`mkfs.ext4 -d TREE -b 4096 -U <fixed> "
          f"-E root_owner=0:0,hash_seed=<fixed>` under `E2FSPROGS_FAKE_TIME`, then atime/ctime set to the same "
          f"epoch with `debugfs`, since `mke2fs -d` copies them from the unpacked files; reproducible: "
          f"{facts.get('ext4_reproducible', '?')}) and **squashfs** (`mksquashfs TREE IMG -noappend -all-root "
          f"-mkfs-time <fixed> -comp {facts.get('squashfs_comp', '?')}`; reproducible: "
          f"{facts.get('squashfs_reproducible', '?')}). \"Reproducible\" = image A built again from a fresh unpack "
          f"is byte-identical.")
        w("")
    goal_rows = []
    for p in pairs:
        name = p["pair"]
        makes = [r for r in recs if r["kind"] == "make" and r["pair"] == name]
        applies = [r for r in recs if r["kind"] == "apply" and r["pair"] == name]
        w(f"### {name}: A {size(p['old_bytes'])} → B {size(p['new_bytes'])} "
          f"({100 * p['identical_4k_blocks']:.1f}% of B's 4 KiB blocks equal A's at the same offset)")
        w("")
        w("| tool | patch | % of B | make (s) | apply (s, median) | apply runs (s) | apply peak RSS | output = B (sha256) |")
        w("|---|---|---|---|---|---|---|---|")
        summary = {}
        for m in makes:
            runs = [a for a in applies if a["tool"] == m["tool"]]
            if m.get("timeout"):
                w(f"| {m['tool']} | — | — | did not finish: stopped after {m['wall_s']:.0f} s | — | — | — | — |")
                continue
            if m.get("failed"):
                w(f"| {m['tool']} | — | — | failed after {m['wall_s']:.0f} s (exit {m['rc']}) | — | — | — | — |")
                continue
            med = statistics.median(a["wall_s"] for a in runs) if runs else float("nan")
            rss = max((a["maxrss_kib"] or 0) for a in runs) if runs else 0
            ok = all(a["ok"] for a in runs) and runs
            summary[m["tool"]] = {"bytes": m["patch_bytes"], "apply": med, "family": m["family"],
                                  "make": m["wall_s"], "rss_mib": rss / 1024, "new_bytes": p["new_bytes"]}
            extra = ""
            if m["family"] == "outpost" and runs:
                extra = f" (in-process {statistics.median(a['internal_s'] for a in runs):.2f})"
            w(f"| {m['tool']} | {m['patch_bytes']:,} B ({size(m['patch_bytes'])}) | "
              f"{100 * m['patch_bytes'] / p['new_bytes']:.2f}% | {fmt_s(m['wall_s'])} | **{med:.2f}**{extra} | "
              f"{', '.join('%.2f' % a['wall_s'] for a in runs)} | {rss / 1024:.0f} MiB | "
              f"{'yes, ' + str(len(runs)) + '/' + str(len(runs)) if ok else 'NO'} |")
        w("")
        refs = {k: statistics.median(r["wall_s"] for r in recs if r["kind"] == "ref" and r["pair"] == name
                                     and r["what"] == k and r["rc"] == 0)
                for k in ("cp", "sha256") if any(r["kind"] == "ref" and r["pair"] == name and r["what"] == k
                                                 for r in recs)}
        if refs:
            w(f"For scale, in the same runs: `cp B OUT` (read B from the page cache, write it to the page cache) "
              f"{refs.get('cp', float('nan')):.2f} s; `openssl dgst -sha256 B` {refs.get('sha256', float('nan')):.2f} s "
              f"(medians).")
            w("")
        goal_rows.append((name, summary, refs))
    if goal_rows:
        w("### Goals: patch no larger than xdelta3's, applied at least 3× faster")
        w("")
        w("Reference: `xdelta3 -9` (its best level; the other xdelta3 variants are in the tables above, and the "
          "smallest xdelta3 patch of the pair is given too). Size ratio = Outpost patch ÷ xdelta3 patch "
          "(goal ≤ 1.00); speed ratio = xdelta3 apply time ÷ Outpost apply time (goal ≥ 3.0). Apply times are "
          "whole-process wall times (read A and the patch, write B to the page cache, each run after a `sync` so "
          "no earlier write-back lands in it); Outpost's include the sha256 of B that the agent computes while "
          "streaming, xdelta3 only checks its own window checksums.")
        w("")
        w("| pair | Outpost | ÷ `xdelta3 -9` size | ÷ smallest xdelta3 size | `xdelta3 -9` apply ÷ Outpost apply | goals met |")
        w("|---|---|---|---|---|---|")
        for name, summary, refs in goal_rows:
            outs = [(k, v) for k, v in summary.items() if v["family"] == "outpost"]
            xds = {k: v for k, v in summary.items() if v["family"] == "xdelta3"}
            ref = xds.get("xdelta3 -9") or (min(xds.values(), key=lambda v: v["bytes"]) if xds else None)
            if not ref:
                continue
            best_k, best = min(xds.items(), key=lambda kv: kv[1]["bytes"])
            for ko, vo in outs:
                sr, br, ar = vo["bytes"] / ref["bytes"], vo["bytes"] / best["bytes"], ref["apply"] / vo["apply"]
                met = [g for g, ok in (("size", sr <= 1.0), ("speed", ar >= 3.0)) if ok]
                w(f"| {name} | {ko} | {sr:.3f}{' ✓' if sr <= 1.0 else ' ✗'} | {br:.3f} ({best_k}) | "
                  f"{ar:.2f}×{' ✓' if ar >= 3.0 else ' ✗'} | {' and '.join(met) if met else 'neither'} |")
        w("")
        for name, summary, refs in goal_rows:
            xd = summary.get("xdelta3 -9")
            if xd and "cp" in refs:
                w(f"- {name}: a 3× faster apply than `xdelta3 -9` ({xd['apply']:.2f} s) would take "
                  f"{xd['apply'] / 3:.2f} s; only writing B (`cp`) takes {refs['cp']:.2f} s here and hashing it "
                  f"{refs.get('sha256', float('nan')):.2f} s.")
        for name, s2, _ in goal_rows:
            o = next((v for v in s2.values() if v["family"] == "outpost"), None)
            xd = s2.get("xdelta3 -9")
            if o and xd:
                w(f"- {name}: Outpost's apply peaks at {o['rss_mib']:.0f} MiB "
                  f"({o['rss_mib'] * MIB / o['new_bytes']:.2f}× the image: the windowed format reads A by "
                  f"positional reads and decodes one region at a time), `xdelta3 -9` at {xd['rss_mib']:.0f} MiB.")
        bs = [(n, s2) for n, s2, _ in goal_rows for k, v in s2.items() if v["family"] == "bsdiff"]
        for name, s2 in bs:
            vb = next(v for v in s2.values() if v["family"] == "bsdiff")
            o = next((v for k, v in s2.items() if v["family"] == "outpost"), None)
            if o:
                w(f"- {name}: bsdiff's patch is {vb['bytes'] / o['bytes']:.3f}× Outpost's first level's and "
                  f"its apply {vb['apply'] / o['apply']:.1f}× slower.")
        w("")
    setup = next((r for r in recs if r["kind"] == "resume_setup"), None)
    base = next((r for r in recs if r["kind"] == "resume_baseline"), None)
    trials = [r for r in recs if r["kind"] == "resume_trial"]
    if setup and base:
        n = setup["image_bytes"]
        ck = setup["checkpoint_bytes"]
        w("### Resumed download: bytes saved")
        w("")
        w(f"A {mib(n)} image (random bytes) published with `outpost release publish --server` to a running "
          f"`outpost-server`; a fresh device runs `outpost-agent run --once` (file A/B backend, "
          f"`bandwidth_limit_bytes_per_sec = {setup['rate']}`) through a counting TCP proxy on 127.0.0.1. "
          f"In each trial the proxy stops forwarding after r bytes of the image (r uniform in [0, {n}), "
          f"seed {setup['seed']}) and the agent is SIGKILLed at that moment; `run --once` is then started again "
          f"and must end committed with the image in the active slot. A restart from zero would fetch the "
          f"whole image again ({n:,} bytes of body; an uninterrupted run moved {base['down_total']:,} bytes "
          f"server→agent including metadata and headers).")
        w("")
        w("| trial | killed after (image bytes) | agent resumed from (last durable checkpoint) | "
          "fetched after restart | a restart would fetch | **saved** | received before the kill but fetched again |")
        w("|---|---|---|---|---|---|---|")
        saved = []
        for t in trials:
            s = n - t["second_target_body"]
            saved.append(s)
            w(f"| {t['trial']} | {t['cut_at']:,} ({100 * t['cut_at'] / n:.0f}%) | "
              f"{'?' if t['resumed_from'] is None else format(t['resumed_from'], ',')} | "
              f"{t['second_target_body']:,} | {n:,} | **{s:,}** ({100 * s / n:.0f}%) | "
              f"{t['cut_at'] - s:,} |")
        w("")
        ideal = n / 2
        meas = statistics.mean(saved) if saved else float("nan")
        lost = [t["cut_at"] - (n - t["second_target_body"]) for t in trials]
        mean_lost = statistics.mean(lost) if lost else 0.0
        w(f"Expected saving over interruption points uniform in the download: **{mib(ideal)}** per interruption "
          f"(half the image) if the download continued from the exact byte where it stopped. The agent continues "
          f"from the last checkpoint it journaled (the partial file is fsynced about every {mib(ck)}, the offset "
          f"journaled when the next bytes arrive), so the bytes received after that checkpoint are fetched again: "
          f"{mib(mean_lost)} on average here (min {mib(min(lost, default=0))}, max {mib(max(lost, default=0))}), "
          f"which makes the expected saving about {mib(max(ideal - mean_lost, 0))}. Measured mean over these "
          f"{len(saved)} trials: **{mib(meas)}** saved per interruption ({100 * meas / n:.0f}% of the image; "
          f"their mean kill offset is {mib(statistics.mean(t['cut_at'] for t in trials)) if trials else '?'}).")
        w("")
    w("Method and knobs: [bench/README.md](../bench/README.md) (section *Delta updates*). Everything runs on one "
      "machine with the images in the page cache, so times are CPU and memory bound; on 2 cores the tools run one "
      "at a time. Compare ratios from the same run, not absolute times across machines.")
    w(END)
    return "\n".join(L) + "\n"


def cmd_report(args) -> int:
    section = render(load(args.record))
    sys.stdout.write(section)
    out = Path(args.out)
    text = out.read_text(encoding="utf-8") if out.exists() else ""
    b, e = text.find(BEGIN), text.find(END)
    if b >= 0 and e > b:
        text = text[:b] + section.rstrip("\n") + text[e + len(END):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    out.write_text(text, encoding="utf-8")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("codecs")
    c.add_argument("--record", required=True)
    c.add_argument("--work", required=True)
    c.add_argument("--log")
    c.add_argument("--delta-bin", required=True)
    c.add_argument("--levels", default="19")
    c.add_argument("--runs", type=int, default=3)
    c.add_argument("--xdelta", default="-9")
    c.add_argument("--bsdiff", default="1")
    c.add_argument("--bsdiff-timeout", type=float, default=1800)
    c.add_argument("--pair", action="append", required=True)
    r = sub.add_parser("resume")
    r.add_argument("--record", required=True)
    r.add_argument("--work", required=True)
    r.add_argument("--log")
    r.add_argument("--agent-bin", required=True)
    r.add_argument("--server-url", required=True)
    r.add_argument("--trusted-root", required=True)
    r.add_argument("--image", required=True)
    r.add_argument("--rate", type=int, required=True)
    r.add_argument("--trials", type=int, default=5)
    r.add_argument("--seed", type=int, default=20261123)
    p = sub.add_parser("report")
    p.add_argument("--record", required=True)
    p.add_argument("--out", required=True)
    args = ap.parse_args()
    return {"codecs": cmd_codecs, "resume": cmd_resume, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
