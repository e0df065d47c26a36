"""Installs into slots that are block devices, streamed (issue 18 part 3).

The device is the agent with its file boot backend whose slot files are symlinks to
loop devices (`losetup --find --show` on sparse files in tmp; root): the file backend
opens whatever the slot path names, so its slots are real partitions. Black-box, like
test_install.py: the built binaries, real HTTP through the proxy fixture, SIGKILL as
the power cut.

- (a) a full and a zstd release go into the partition with no staged image ever in
  the download directory, and the partition's first `length` bytes are the image;
- (b) a server that sends wrong bytes leaves the boot environment untouched;
- (c) a connection cut mid-way: the next run resumes on the partition from the
  journaled durable offset;
- (d) SIGKILL at several points of a partition install;
- (e) an image longer than the partition is refused before anything is written.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from pathlib import Path

import pytest

from conftest import HASH_WORDS, Device, assert_fails, run, sha256_hex
from test_install import (
    MiB,
    changed,
    compressible,
    image,
    new_device,
    publish,
    results,
    target_gets,
    wait_for,
)

MARK = b"\xee"


class LoopDisk:
    """A loop device over a sparse file of `size` bytes whose first MiB is MARK."""

    def __init__(self, backing: Path, size: int) -> None:
        with open(backing, "wb") as f:
            f.write(MARK * MiB)
            f.truncate(size)
        p = run(["losetup", "--find", "--show", str(backing)])
        assert p.returncode == 0, p.describe()
        self.path = Path(p.stdout.strip())
        self.size = size

    def head(self, n: int) -> bytes:
        with open(self.path, "rb") as f:
            return f.read(n)

    def detach(self) -> None:
        run(["losetup", "--detach", str(self.path)])


@pytest.fixture
def loop_disks(tmp_path):
    """Factory: loop_disks(size) -> a LoopDisk; all are detached after the test."""
    disks: list[LoopDisk] = []

    def make(size: int) -> LoopDisk:
        d = LoopDisk(tmp_path / f"partition-{len(disks)}.img", size)
        disks.append(d)
        return d

    yield make
    for d in disks:
        d.detach()


def partition_device(fleet, tmp_path, loop_disks, size: int = 16 * MiB, **kw) -> tuple[Device, dict]:
    """A fresh device whose slots A and B are loop devices of `size` bytes."""
    dev = new_device(fleet, tmp_path, **kw)
    disks = {}
    dev.boot_dir.mkdir(parents=True, exist_ok=True)
    for s in ("A", "B"):
        disks[s] = loop_disks(size)
        p = dev.slot_path(s)
        if p.exists() or p.is_symlink():
            p.unlink()
        p.symlink_to(disks[s].path)
    return dev, disks


def slot_holds(dev: Device, disks: dict, slot: str, rel: dict) -> bool:
    return sha256_hex(disks[slot].head(rel["length"])) == rel["sha256"]


def expect_committed_on(dev: Device, disks: dict, res, rel: dict, slot: str) -> None:
    ctx = res.describe() + "\n" + dev.state_summary()
    assert res.returncode == 0, ctx
    assert {"result": "committed", "version": rel["version"], "slot": slot} in results(res), ctx
    env = dev.bootenv()
    assert env["active"] == slot and env["trial"] is None, ctx
    assert slot_holds(dev, disks, slot, rel), "the partition's first bytes are not the image\n" + ctx


class DirWatch:
    """Polls a directory while an agent runs: the largest size each file name reached."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for e in os.scandir(self.path):
                    try:
                        size = e.stat().st_size
                    except OSError:
                        continue
                    self.seen[e.name] = max(size, self.seen.get(e.name, 0))
            except OSError:
                pass
            time.sleep(0.002)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(5)
        return self.seen


def run_watched(dev: Device):
    watch = DirWatch(dev.downloads)
    try:
        res = dev.run_once(timeout=120)
    finally:
        seen = watch.stop()
    return res, seen


# ===================================================== (a) streamed, nothing staged
def test_full_image_streams_into_the_partition_with_nothing_staged(fleet, tmp_path, loop_disks):
    dev, disks = partition_device(fleet, tmp_path, loop_disks,
                                  install={"bandwidth_limit_bytes_per_sec": 16 * MiB})
    v1 = publish(fleet, image("v1", 6 * MiB + 123), "1.0.0")
    res, seen = run_watched(dev)
    expect_committed_on(dev, disks, res, v1, "B")
    assert seen == {}, f"files appeared in the download directory of a partition install: {seen}"
    with open(disks["B"].path, "rb") as f:
        f.seek(v1["length"])
        assert f.read(4096) == b"\0" * 4096, "bytes past the image were written"
    assert disks["A"].head(MiB) == MARK * MiB, "the active slot was written"


def test_zstd_image_decodes_into_the_partition_keeping_only_compressed_bytes(
        fleet, tmp_path, loop_disks, proxy_factory):
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    dev, disks = partition_device(fleet, tmp_path, loop_disks, server_url=proxy.url,
                                  install={"bandwidth_limit_bytes_per_sec": 4 * MiB})
    v1 = publish(fleet, compressible("z1", 8 * MiB), "1.0.0", "--zstd")
    res, seen = run_watched(dev)
    expect_committed_on(dev, disks, res, v1, "B")
    sent = sum(r.sent for r in target_gets(proxy, "/1.0.0/"))
    assert 0 < sent < v1["length"] // 2, "the zstd target was not what was fetched"
    assert all(n.endswith(".partial") for n in seen), f"a staged image appeared: {seen}"
    assert max(seen.values(), default=0) <= sent, f"more than the compressed bytes were kept: {seen}"


# ======================================================= (b) a lying server
def test_wrong_bytes_into_the_partition_leave_the_boot_environment_untouched(
        fleet, tmp_path, loop_disks, proxy_factory):
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    dev, disks = partition_device(fleet, tmp_path, loop_disks, server_url=proxy.url)
    v1 = publish(fleet, image("v1", 3 * MiB), "1.0.0")
    expect_committed_on(dev, disks, dev.run_once(), v1, "B")
    v2 = publish(fleet, image("v2", 5 * MiB), "2.0.0")

    def lie(req, answer):
        if req.is_target and "/2.0.0/" in req.path:
            bad = bytearray(answer.body)
            bad[len(bad) // 2] ^= 0xFF
            answer.body = bytes(bad)
    proxy.rule = lie
    res = dev.run_once()
    ctx = res.describe() + "\n" + dev.state_summary()
    assert_fails(res, *HASH_WORDS)
    assert "2.0.0" in res.stderr, "the error does not name the target\n" + ctx
    env = dev.bootenv()
    assert env["active"] == "B" and env["trial"] is None, "the boot environment changed\n" + ctx
    assert slot_holds(dev, disks, "B", v1), "the active slot changed\n" + ctx
    assert dev.journal()["running"]["version"] == "1.0.0", ctx

    proxy.rule = None
    proxy.clear()
    res = dev.run_once()
    expect_committed_on(dev, disks, res, v2, "A")
    gets = target_gets(proxy, "/2.0.0/")
    assert gets and gets[0].range in (None, "bytes=0-"), f"resumed on unverified bytes: {gets}"


# ================================================= (c) resume on the partition
def test_cut_connection_resumes_on_the_partition_from_the_durable_offset(
        fleet, tmp_path, loop_disks, proxy_factory):
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    dev, disks = partition_device(fleet, tmp_path, loop_disks, server_url=proxy.url,
                                  install={"retries": 0})
    v1 = publish(fleet, image("v1", 10 * MiB), "1.0.0")
    cut = 6 * MiB + 4321

    def cut_first(req, answer):
        if req.is_target and "/1.0.0/" in req.path and req.nth == 0:
            answer.cut_after = cut
    proxy.rule = cut_first
    res = dev.run_once()
    ctx = res.describe() + "\n" + dev.state_summary()
    assert res.returncode != 0, "a cut with no retries left should end the run\n" + ctx
    phase = dev.journal()["phase"]
    assert phase["phase"] == "downloading" and phase.get("into") == "B", ctx
    durable = phase["durable"]
    assert 0 < durable <= cut, ctx
    assert disks["B"].head(durable) == v1["file"].read_bytes()[:durable], \
        "the journal's durable offset counts bytes that are not on the partition\n" + ctx
    assert dev.bootenv()["active"] == "A" and dev.bootenv()["trial"] is None, ctx
    assert list(dev.downloads.iterdir()) == [], "a partial copy was kept on the data partition"

    proxy.rule = None
    proxy.clear()
    res = dev.run_once()
    expect_committed_on(dev, disks, res, v1, "B")
    gets = target_gets(proxy, "/1.0.0/")
    assert gets and gets[0].range == f"bytes={durable}-", [(r.range, r.sent) for r in gets]
    assert sum(r.sent for r in gets) == v1["length"] - durable


# =================================================== (d) power cuts mid-install
def test_sigkill_at_several_points_of_a_partition_install(fleet, tmp_path, loop_disks):
    dev, disks = partition_device(fleet, tmp_path, loop_disks,
                                  install={"bandwidth_limit_bytes_per_sec": 8 * MiB})
    v1 = publish(fleet, image("v1", 2 * MiB), "1.0.0")
    expect_committed_on(dev, disks, dev.run_once(), v1, "B")
    v2 = publish(fleet, image("v2", 12 * MiB), "2.0.0")
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    for cut in range(6):
        agent = dev.start(tag=f"cut{cut}")
        time.sleep(rnd.uniform(0.05, 0.8))
        agent.power_cut()
        ctx = f"seed {seed}, cut {cut}\n" + dev.state_summary()
        env = dev.bootenv()
        if env["active"] == "A" or env["trial"] is not None:
            # Only ever armed or switched once slot A reads back as the signed image.
            assert slot_holds(dev, disks, "A", v2), "a trial was armed on an unverified slot\n" + ctx
        else:
            assert env["active"] == "B" and slot_holds(dev, disks, "B", v1), ctx
    res = dev.run_once(timeout=120)
    ctx = f"seed {seed}\n" + res.describe() + "\n" + dev.state_summary()
    assert res.returncode == 0, ctx
    j = dev.journal()
    assert j["phase"]["phase"] == "committed" and j["running"]["version"] == "2.0.0", ctx
    assert dev.bootenv()["active"] == "A" and dev.bootenv()["trial"] is None, ctx
    assert slot_holds(dev, disks, "A", v2), ctx


# ============================================= (e) image larger than the partition
def test_an_image_longer_than_the_partition_is_refused_before_writing(
        fleet, tmp_path, loop_disks, proxy_factory):
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    dev, disks = partition_device(fleet, tmp_path, loop_disks, size=4 * MiB, server_url=proxy.url)
    publish(fleet, image("big", 4 * MiB + 1), "1.0.0")
    res = dev.run_once()
    assert_fails(res, str(dev.slot_path("B")), str(disks["B"].path))
    assert re.search(r"too small|partition", res.stderr), res.describe()
    assert disks["B"].head(MiB) == MARK * MiB, "bytes were written into the partition"
    assert target_gets(proxy, "/1.0.0/") == [], "the image was fetched although it cannot fit"
    env = dev.bootenv()
    assert env["active"] == "A" and env["trial"] is None, res.describe()


# ================================================ (f) a delta with bounded memory
def peak_rss_while(agent) -> int:
    """The largest VmHWM (KiB) seen while `agent` runs (polled: a re-exec "reboot"
    starts a new count, so the maximum over the samples is taken)."""
    peak = 0
    while agent.alive():
        try:
            status = Path(f"/proc/{agent.pid}/status").read_text()
        except OSError:
            break
        m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        if m:
            peak = max(peak, int(m.group(1)))
        time.sleep(0.005)
    return peak


def test_a_delta_into_a_partition_reads_its_base_from_the_active_partition(
        fleet, tmp_path, loop_disks, proxy_factory):
    repo, server, token = fleet
    proxy = proxy_factory(server.url)
    size = 64 * MiB
    dev, disks = partition_device(fleet, tmp_path, loop_disks, size=72 * MiB, server_url=proxy.url)
    v1 = publish(fleet, image("v1", size), "1.0.0")
    expect_committed_on(dev, disks, dev.run_once(timeout=120), v1, "B")
    data2 = changed(v1["file"].read_bytes(), "v2", edits=32)
    v2 = publish(fleet, data2, "2.0.0", "--delta-from", "1.0.0", "--delta-base", v1["file"],
                 "--delta-level", "3")
    proxy.clear()
    agent = dev.start(tag="delta")
    peak_kib = peak_rss_while(agent)
    res = agent.wait(120)
    expect_committed_on(dev, disks, res, v2, "A")
    gets = target_gets(proxy, "/2.0.0/")
    assert [r for r in gets if "patch" in r.path], f"no delta was fetched: {[r.path for r in gets]}"
    assert not [r for r in gets if r.path.endswith(".fw.img")], "the full image was fetched"
    assert list(dev.downloads.iterdir()) in ([],) or all(
        p.suffix == ".partial" for p in dev.downloads.iterdir())
    print(f"delta install into a partition: peak RSS {peak_kib} KiB")
    # The base is never held in memory: the peak stays far below the image (the
    # single-frame format held the base and a window as large: over twice the image).
    assert 0 < peak_kib < 40 * 1024, f"peak RSS {peak_kib} KiB while applying a delta of a {size}-byte image"
