"""The agent on a virtual device that boots for real (tests/vm.py): OVMF, GRUB with
try-once boot counting, A/B root partitions, a swtpm TPM, systemd. GRUB decides what
boots; the agent installs into the inactive partition and reboots the machine.

Every boot runs under TCG (no KVM on this machine kind), so the scenarios share boots
where the story allows, and two devices boot side by side on the machine's two cores
where the stories are independent: the byte-flip and the attested stories run in a
second lane (a thread, their own servers) while the update test runs its device."""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN_DIR, OutpostRepo, OutpostServer, list_incidents, list_reports
import vm

HARDWARE_CLASS = "qemu-x86_64"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Slot images (ext4 root filesystems with this build's agent package): the
    factory image 1.0.0, the updates 2.0.0 and 3.0.0 (published with a health check
    that fails), and 4.0.0 whose init exits at once (the kernel panics)."""
    d = tmp_path_factory.mktemp("vm-images")
    agent = agent_deb()
    try:
        vm.image_sh("base", timeout=1200)
        vm.image_sh("esp")
        return {
            "1.0.0": vm.slot_image(d / "1.0.0.ext4", "1.0.0", agent),
            "2.0.0": vm.slot_image(d / "2.0.0.ext4", "2.0.0", agent),
            "3.0.0": vm.slot_image(d / "3.0.0.ext4", "3.0.0", agent),
            "4.0.0": vm.slot_image(d / "4.0.0.ext4", "4.0.0", agent, kind="panic"),
        }
    except vm.VmError as e:
        pytest.fail(str(e), pytrace=False)


def agent_deb() -> Path:
    """The agent's package that scripts/test.sh built (scripts/packages.sh)."""
    debs = sorted((BIN_DIR.parent / "debian").glob("outpost-agent_*_amd64.deb"))
    if len(debs) != 1:
        pytest.fail(f"expected one outpost-agent .deb in target/debian, found {debs}: run bash scripts/packages.sh --profile dev (scripts/test.sh does)",
                    pytrace=False)
    return debs[0]


@pytest.fixture
def vm_fleet(outpost_repo, server_factory):
    """A repository with a role for this hardware class's firmware, on a running server."""
    outpost_repo.delegate_firmware(role="x86-firmware", paths=f"firmware/{HARDWARE_CLASS}/*/*")
    server, token = server_factory(outpost_repo)
    outpost_repo.cli("repo", "push", "--repo", outpost_repo.dir, "--server", server.url, "--token", token)
    return outpost_repo, server, token


def own_fleet(base: Path, servers: list, measurement: str | None = None) -> tuple:
    """What vm_fleet makes (with `measurement`, a server that judges by it), under `base`, for a
    story in the second lane: its own repository and server (appended to `servers`)."""
    repo = OutpostRepo(base / "signer")
    repo.init()
    repo.delegate_firmware()
    repo.director_init()
    repo.delegate_firmware(role="x86-firmware", paths=f"firmware/{HARDWARE_CLASS}/*/*")
    server = OutpostServer(base, repo, measurement=measurement)
    servers.append(server)
    token = server.token()
    server.start()
    repo.cli("repo", "push", "--repo", repo.dir, "--server", server.url, "--token", token)
    return repo, server, token


class Lane:
    """A second lane for stories of one device each, so that two devices boot side by
    side: the first test starts them, each story's own test waits for its result (and
    fails with its error). A test run alone (-k) starts its story itself."""

    def __init__(self, stories: dict) -> None:
        self.stories = stories
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="vm-lane")
        self.started: dict[str, Future] = {}

    def start(self, *names: str) -> None:
        # Called from the tests' own thread only: the lane never starts stories.
        for name in names:
            if name not in self.started:
                self.started[name] = self.pool.submit(self.stories[name])

    def result(self, name: str):
        self.start(name)
        return self.started[name].result()


@pytest.fixture(scope="module")
def lane(images, tmp_path_factory):
    servers: list[OutpostServer] = []

    def byte_flip():
        base = tmp_path_factory.mktemp("lane-byte-flip")
        return byte_flip_story(own_fleet(base, servers), images, base)

    def attested():
        base = tmp_path_factory.mktemp("lane-attested")
        return attested_story(own_fleet(base, servers, measurement=ATTESTED_CLASS), images, base)

    lane = Lane({"byte-flip": byte_flip, "attested": attested})
    yield lane
    lane.pool.shutdown(wait=True)
    for server in servers:
        server.stop()


def publish_slot(fleet, image: Path, version: str, *extra: str) -> None:
    repo, server, token = fleet
    repo.cli("release", "publish", "--repo", repo.dir, "--firmware", image, "--hardware-class", HARDWARE_CLASS,
             "--version", version, "--key", repo.key("x86-firmware"), "--zstd", "--zstd-level", "3", *vm.verity_args(image), *extra,
             "--server", server.url, "--token", token, timeout=300)


def device(fleet, images, tmp_path: Path, name: str = "vm-1", extra: str = "", trial_attempts: int = 1) -> vm.VirtualDevice:
    repo, server, _ = fleet
    data = vm.data_partition(tmp_path / "data.ext4", {
        "agent.toml": vm.agent_toml(HARDWARE_CLASS, name, extra=extra, trial_attempts=trial_attempts).encode(),
        "root.json": repo.root1,
    })
    disk = tmp_path / "disk.raw"
    vm.image_sh("disk", str(disk), str(images["1.0.0"]), str(data))
    return vm.VirtualDevice(tmp_path / "vm", disk, server.port)


def wait_report(server, device_id: str, version: str, outcome: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        for r in list_reports(server, device_id):
            if r["version"] == version and r["outcome"] == outcome:
                return r
        if time.monotonic() > deadline:
            raise AssertionError(f"no {outcome} report for {version} from {device_id} within {timeout:.0f} s: "
                                 f"{list_reports(server, device_id)}")
        time.sleep(2)


def test_update_across_a_real_reboot_then_rollbacks_from_a_failed_health_check_and_a_kernel_panic(vm_fleet, images, lane, tmp_path):
    # The byte-flip and attested stories boot their devices beside this one.
    lane.start("byte-flip", "attested")
    _, server, _ = vm_fleet
    publish_slot(vm_fleet, images["2.0.0"], "2.0.0")
    dev = device(vm_fleet, images, tmp_path)
    dev.start()
    try:
        # Factory slot A boots; the agent writes 2.0.0 into partition B, arms a trial
        # and reboots the machine; GRUB spends the attempt and boots B.
        dev.wait_serial(r"outpost: booting slot B \(trial\)", timeout=900)
        report = wait_report(server, "vm-1", "2.0.0", "committed", timeout=600)
        assert report["slot"] == "B", report
        assert dev.cmdline_slot() == "B"
        _, release = dev.sh("cat /etc/outpost-release")
        assert "OUTPOST_RELEASE=2.0.0" in release
        env = dev.grubenv()
        assert env.get("outpost_active") == "B" and env.get("outpost_trial", "") == "", env
        assert dev.boots() == [("A", "normal"), ("B", "trial")], dev.boots()
        # The root is mapped through dm-verity with 2.0.0's signed root hash, which the
        # agent put in the environment block and GRUB on the kernel command line.
        verity = Path(f"{images['2.0.0']}.verity").read_text().strip()
        assert env.get("outpost_verity_B") == verity, env
        _, cmdline = dev.sh("cat /proc/cmdline")
        assert f"outpost.verity={verity}" in cmdline, cmdline
        _, mapped = dev.sh("findmnt -no SOURCE /; dmsetup table outpost-root; dmsetup status outpost-root")
        assert mapped.splitlines()[0] == "/dev/mapper/outpost-root", mapped
        assert f" verity 1 " in mapped and verity.split(",")[0] in mapped and "restart_on_corruption" in mapped, mapped
        # The agent is the packaged one, a Type=notify service that said it was ready.
        _, unit = dev.sh("dpkg-query -W -f='${Status}\\n' outpost-agent; systemctl show -p Type -p ActiveState outpost-agent")
        for want in ("install ok installed", "Type=notify", "ActiveState=active"):
            assert want in unit, unit

        # 3.0.0 boots, and its signed health check fails: the agent cancels the trial
        # and reboots; GRUB boots the committed slot B.
        publish_slot(vm_fleet, images["3.0.0"], "3.0.0", "--health-command", "test -e /etc/outpost-healthy")
        mark = len(dev.serial())
        dev.wait_serial(r"outpost: booting slot A \(trial\)", timeout=900, after=mark)
        dev.wait_serial(r"outpost: booting slot B \(normal\)", timeout=600, after=mark)
        rolled = wait_report(server, "vm-1", "3.0.0", "rolled_back", timeout=600)
        assert "/etc/outpost-healthy" in (rolled.get("reason") or ""), rolled

        # 4.0.0's init exits and the kernel panics: nothing on the device can confirm
        # it. GRUB's count runs out and it boots the committed slot B again.
        publish_slot(vm_fleet, images["4.0.0"], "4.0.0")
        mark = len(dev.serial())
        dev.wait_serial(r"outpost: booting slot A \(trial\)", timeout=900, after=mark)
        dev.wait_serial(r"Kernel panic", timeout=300, after=mark)
        dev.wait_serial(r"outpost: booting slot B \(exhausted\)", timeout=300, after=mark)
        rolled = wait_report(server, "vm-1", "4.0.0", "rolled_back", timeout=600)
        assert "attempts ran out" in (rolled.get("reason") or ""), rolled
        # The kernel's dump of the panic survived in EFI pstore, and the reason says it.
        assert "Kernel panic - not syncing" in rolled["reason"] and "pstore record dmesg-efi-" in rolled["reason"], rolled
        assert dev.cmdline_slot() == "B"
        _, release = dev.sh("cat /etc/outpost-release")
        assert "OUTPOST_RELEASE=2.0.0" in release
        # The failed release is not tried again: the agent's journal keeps it as failed,
        # and no trial is armed however many checks pass (it checks every 5 s).
        time.sleep(12)
        _, journal = dev.sh("cat /var/lib/outpost/agent/journal.json")
        failed = [r["version"] for r in json.loads(journal)["failed"]]
        assert "4.0.0" in failed and "3.0.0" in failed, journal
        assert dev.grubenv().get("outpost_trial", "") == "", dev.grubenv()
        assert dev.boots()[-1] == ("B", "exhausted"), dev.boots()

    finally:
        dev.stop()


def test_a_byte_changed_in_the_running_root_restarts_the_machine_and_is_reported(lane):
    lane.result("byte-flip")


def byte_flip_story(fleet, images, tmp_path: Path) -> None:
    """Root changes one byte of the running root filesystem on its block device (a file
    nothing reads at boot). The next read of that block fails dm-verity: the kernel
    restarts the machine before a program sees the byte, and GRUB boots the committed
    slot again (the byte is still changed on the disk). The kernel's log went to EFI
    variables on the way down (efi_pstore): after the restart the agent reads the
    record, journals the incident, deletes the record and reports it, and the server
    shows the block the console printed, for the slot whose partition it is."""
    _, server, _ = fleet
    dev = device(fleet, images, tmp_path, name="vm-flip")
    dev.start()
    try:
        dev.wait_up()
        block = debugfs_block(images["1.0.0"], "/usr/share/common-licenses/GPL-3")
        at = block * 4096 + 100
        _, before = dev.sh(f"dd if=/dev/vda2 bs=1 skip={at} count=1 status=none | od -An -tx1")
        flipped = int(before.split()[0], 16) ^ 0x20
        mark = len(dev.serial())
        dev.sh(f"printf '\\{flipped:03o}' | dd of=/dev/vda2 bs=1 seek={at} count=1 conv=notrunc,fsync status=none"
               " && echo 3 >/proc/sys/vm/drop_caches && sync")
        # The reader runs detached: the shell answers before the machine restarts.
        dev.sh("nohup sh -c 'sleep 1; md5sum /usr/share/common-licenses/GPL-3 >/dev/ttyS0' >/dev/null 2>&1 &")
        corrupted = dev.wait_serial(rf"verity: (\d+:\d+): data block {block} is corrupted", timeout=120, after=mark)
        dev.wait_serial(r"outpost: booting slot A \(normal\)", timeout=300, after=mark)
        dev.wait_up()
        incident = wait_incident(server, "vm-flip", block, timeout=300)
        # The factory image: the agent has installed nothing, so it names no release.
        assert (incident["dev"], incident["slot"], incident["release"], incident["kind"]) == (corrupted.group(1), "A", None, "verity_data"), incident
        assert f"data block {block} is corrupted" in incident["line"] and not incident["attested"], incident
        assert incident["record"].startswith("dmesg-efi-") and incident["hardware_class"] == HARDWARE_CLASS, incident
        # Journaled, sent and forgotten; the records (this restart's and every orderly
        # shutdown's) are gone from the EFI variables.
        _, left = dev.sh("ls /sys/fs/pstore; cat /var/lib/outpost/agent/incidents.json")
        assert "dmesg-" not in left and '"pending": []' in left, left
        _, after = dev.sh(f"dd if=/dev/vda2 bs=1 skip={at} count=1 status=none | od -An -tx1")
        assert int(after.split()[0], 16) == flipped, (before, after)
        # Nothing printed the file's checksum: the read never returned.
        assert "GPL-3" not in dev.serial()[mark:], dev.serial()[mark:]
        assert dev.cmdline_slot() == "A"
        assert dev.boots() == [("A", "normal"), ("A", "normal")], dev.boots()
    finally:
        dev.stop()


def wait_incident(server, device_id: str, block: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        for i in list_incidents(server, device_id):
            if i["block"] == block:
                return i
        if time.monotonic() > deadline:
            raise AssertionError(f"no integrity incident for block {block} from {device_id} within {timeout:.0f} s: {list_incidents(server, device_id)}")
        time.sleep(2)


def debugfs_block(image: Path, path: str) -> int:
    """The filesystem block (4096 bytes, from the image's start) that holds the first
    bytes of `path` in an ext4 slot image."""
    res = subprocess.run(["debugfs", "-R", f"bmap {path} 0", str(image)], capture_output=True, text=True, check=True)
    return int(res.stdout.strip())


# ============================================================ measured boot
ATTESTED_CLASS = f'\n[attestation.classes."{HARDWARE_CLASS}"]\nboot_event_log = true\n'
EVENT_LOG = "/sys/kernel/security/tpm0/binary_bios_measurements"


def test_attested_by_the_boot_chain_and_quarantined_when_root_changes_the_kernel_command_line(lane):
    lane.result("attested")


def attested_story(fleet, images, tmp_path: Path) -> None:
    """A server that judges this class by its boot chain (the firmware's event log
    against the golden values signed into its releases) attests a fresh device, then
    quarantines it when root changes the kernel command line."""
    from test_attestation import Ops
    repo, server, token = fleet
    ops = Ops(fleet)

    def publish(version: str) -> None:
        # The golden values of this release: its slot's dm-verity root is on the
        # measured command line, so they differ from release to release.
        golden = vm.image_sh("golden-args", str(images[version])).splitlines()
        repo.cli("release", "publish", "--repo", repo.dir, "--firmware", images[version], "--hardware-class", HARDWARE_CLASS,
                 "--version", version, "--key", repo.key("x86-firmware"), "--zstd", "--zstd-level", "3", *golden,
                 "--server", server.url, "--token", token, timeout=300)
    publish("1.0.0")
    tpm = '\n[tpm]\ntcti = "device:/dev/tpmrm0"\n' f'boot_event_log = "{EVENT_LOG}"\n'
    data = vm.data_partition(tmp_path / "data.ext4", {
        "agent.toml": vm.agent_toml(HARDWARE_CLASS, "vm-attested", extra=tpm).encode(),
        "root.json": repo.root1,
    })
    disk = tmp_path / "disk.raw"
    vm.image_sh("disk", str(disk), str(images["1.0.0"]), str(data))
    dev = vm.VirtualDevice(tmp_path / "vm", disk, server.port)
    dev.start()
    try:
        dev.wait_up()
        token_ = ops.enrollment_token(hardware_class=HARDWARE_CLASS)
        _, out = dev.sh(f"outpost-agent --config /var/lib/outpost/agent.toml --json enroll --token {token_}", timeout=120)
        device_id = next(json.loads(l) for l in out.splitlines() if l.startswith("{"))["device_id"]
        # The running agent checks in attested: the firmware's and GRUB's events
        # replay to its quote and match 1.0.0's golden values.
        shown = wait_for_device(ops, device_id, lambda d: d["device"]["attestation"] == "attested", 300)
        assert shown["device"]["version"] == "1.0.0" and not shown["device"]["quarantined"], shown["device"]

        # Root on the device changes a kernel argument in grub.cfg on the ESP, reboots.
        dev.sh("sed -i 's/loglevel=4/loglevel=5/' /boot/efi/EFI/outpost/grub.cfg && grep -c loglevel=5 /boot/efi/EFI/outpost/grub.cfg")
        # In the background, a second on: the shell reports back before systemd stops it.
        dev.sh("{ sleep 1; systemctl reboot; } >/dev/null 2>&1 &")
        dev.wait_serial(r"outpost: booting slot A \(normal\)", timeout=300, after=len(dev.serial()) - 200)
        shown = wait_for_device(ops, device_id, lambda d: d["device"]["attestation"] == "failed", 600)
        reason = shown["attestations"][0]["reason"] or ""
        # The server names the event that differs (the first: GRUB's linuxefi command
        # in PCR 8, with the changed argument), and the device is quarantined.
        assert "record" in reason and "PCR 8" in reason and "loglevel=5" in reason, reason
        assert shown["device"]["quarantined"], shown["device"]
        # A quarantined device gets no assignment: the agent says so and installs nothing,
        # at three checks (one each 5 s) after the release is rolled out.
        said = "journalctl -u outpost-agent --no-pager -o cat | grep -c 'quarantined by the server; not installing'"
        publish("2.0.0")
        _, log = dev.sh(said, check=False)
        before = int(log.strip().splitlines()[-1])
        ops.rollout("2.0.0", hardware_class=HARDWARE_CLASS)
        deadline = time.monotonic() + 120
        while True:
            _, log = dev.sh(said, check=False)
            if int(log.strip().splitlines()[-1]) >= before + 3:
                break
            assert time.monotonic() < deadline, f"the agent did not say at three checks that it is quarantined within 120 s: {log}"
            time.sleep(3)
        assert dev.grubenv().get("outpost_trial", "") == "", dev.grubenv()
        assert not any(r["version"] == "2.0.0" for r in list_reports(server, device_id))
        assert dev.boots()[-1] == ("A", "normal"), dev.boots()
    finally:
        dev.stop()


def wait_for_device(ops, device_id: str, pred, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        shown = ops.device(device_id)
        if pred(shown):
            return shown
        if time.monotonic() > deadline:
            raise AssertionError(f"device {device_id} did not get there within {timeout:.0f} s: {shown}")
        time.sleep(3)


# ============================================================ power cuts
def verified_boot(dev: vm.VirtualDevice, signed: dict[str, str]) -> tuple[str, str]:
    """Checks that this boot runs a verified slot: the root is mounted through
    dm-verity over the booted slot's partition, with the root hash the (measured)
    command line carries, which is a signed release's. Returns (slot, version)."""
    _, out = dev.sh("cat /proc/cmdline; findmnt -no SOURCE /; dmsetup table outpost-root; cat /sys/class/block/vda2/dev /sys/class/block/vda3/dev")
    cmdline, source, table, dev_a, dev_b = out.splitlines()[:5]
    slot = re.search(r"outpost\.slot=([AB])", cmdline).group(1)
    word = re.search(r"outpost\.verity=(\S*)", cmdline).group(1)
    assert source == "/dev/mapper/outpost-root", out
    version = next((v for v, w in signed.items() if w == word), None)
    assert version is not None, f"slot {slot} booted with a root hash no release signed: {word!r}"
    part = dev_a if slot == "A" else dev_b
    root, salt, blocks = word.split(",")
    want = f"verity 1 {part} {part} 4096 4096 {blocks} {blocks} sha256 {root} {salt}"
    assert want in table and "restart_on_corruption" in table, (want, table)
    # Slot A holds the factory release until something is installed over it; slot B
    # only ever holds what the agent verified and installed.
    assert (slot, version) in (("A", "1.0.0"), ("B", "2.0.0")), (slot, version)
    return slot, version


def journal(dev: vm.VirtualDevice) -> dict | None:
    """The agent's journal; None when the device does not answer (it is rebooting)."""
    try:
        rc, out = dev.sh("cat /var/lib/outpost/agent/journal.json 2>/dev/null", timeout=20, check=False)
    except vm.VmError:
        return None
    return json.loads(out) if rc == 0 and out.strip() else {}


# Where a partition install can be when the power goes, in the order it gets there.
STAGES = ("download", "decode", "read-back", "armed", "trial-grub", "trial-agent", "done")


def install_stage(dev: vm.VirtualDevice, booted: str) -> tuple[str, float, str] | None:
    """(stage, fraction of the transfer durable, description) of the install of 2.0.0,
    from the agent's journal; None when the device does not answer (it is rebooting).
    A download resumed across boots is kept in the partial file and decoded into the
    partition once complete; then the journal says `downloading` with every byte
    durable, and the files the agent holds open tell the decode (the partial file and
    the partition) from the read-back (the partition alone)."""
    try:
        rc, out = dev.sh("cat /var/lib/outpost/agent/journal.json 2>/dev/null; echo; echo @@;"
                         " ls -l /proc/$(pidof outpost-agent)/fd 2>/dev/null | grep -c '[.]partial$';"
                         " ls -l /proc/$(pidof outpost-agent)/fd 2>/dev/null | grep -c '/dev/vda3$'", timeout=20, check=False)
    except vm.VmError:
        return None
    text, _, counts = out.rpartition("@@")
    j = json.loads(text) if text.strip() else {}
    p = j.get("phase") or {}
    phase = p.get("phase")
    if phase == "downloading":
        durable, length = p.get("durable", 0), (p.get("transfer") or {}).get("length") or 1
        if durable < length:
            return "download", durable / length, f"downloading, {durable}/{length} bytes durable"
        partial_open, partition_open = (int(n) > 0 for n in (counts.split() + ["0", "0"])[:2])
        if partial_open:
            return "decode", 1.0, f"all {length} bytes durable, decoding into partition B and flushing it"
        if not partition_open:
            return "decode", 1.0, f"all {length} bytes durable, the agent not yet decoding them"
        return "read-back", 1.0, "decoded and flushed, reading partition B back against the signed digest"
    if phase in ("installed", "trial_boot"):
        if booted == "A":
            return "armed", 1.0, "installed, trial of B armed, the machine rebooting"
        return "trial-agent", 1.0, f"trial boot of B, the agent checking it (journal: {phase})"
    if phase in ("committed", "rolled_back") and p.get("release", {}).get("version") == "2.0.0":
        return "done", 1.0, f"install ended: {phase}"
    return "download", 0.0, f"not started (journal: {phase})"


def cut_through_an_install(name: str, dev: vm.VirtualDevice, signed: dict[str, str], triggers: list, log: list) -> None:
    """Boots, checks that every boot runs a verified slot, and resets the machine at
    each trigger in turn: ("download", f) once f of the transfer is durable; ("decode",
    s) s seconds after the agent started on a boot that begins with every byte durable
    (it decodes them into the partition then); ("read-back", 0), ("armed", 0),
    ("trial-agent", 0), ("done", 0) as soon as the install is there;
    ("trial-grub", 0) as soon as GRUB announces the trial boot of B on the serial
    console. A trigger whose stage the install passed between two looks (a reboot of
    its own, a short stage) is skipped and logged as such."""
    dev.start()
    mark = 0
    pending = list(triggers)
    began = time.monotonic()

    def reset(what: str, slot: str, version: str) -> None:
        # The plug is pulled and put back: QEMU and the TPM stop, and start again from
        # what is on the disk, the firmware's variables and the TPM's state. (Not the
        # reset button: after a QMP system_reset, OVMF sometimes spun in its DXE phase
        # and printed nothing, through further resets, where a cold start of the same
        # disk, variables and TPM state booted.)
        nonlocal mark
        mark = len(dev.serial())
        dev.power_cut()
        dev.start()
        log.append((name, pending.pop(0)[0], f"boot {slot} {version}", what))
        print(f"{time.monotonic() - began:6.0f} s", *log[-1], flush=True)

    last = "download"  # the stage the last look saw
    while pending:
        kind, arg = pending[0]
        if kind == "trial-grub":
            dev.wait_serial(r"outpost: booting slot B \(trial\)", timeout=900, after=mark)
            reset("GRUB announced the trial boot of B: the attempt is spent", "B", "2.0.0")
            continue
        if kind == "decode":
            # The decode starts as the agent does, when every byte is durable: before
            # the shell answers a look under TCG. Timed from the agent's start.
            if last not in ("decode", "read-back"):
                log.append((name, f"skipped {kind} {arg}", "-", f"the last look saw {last}"))
                pending.pop(0)
                continue
            dev.wait_serial(r"Started .{0,40}outpost-agent", timeout=900, after=mark)
            time.sleep(arg)
            reset(f"{arg:.0f} s after the agent started with every byte durable (decoding into partition B)", "A", "1.0.0")
            continue
        dev.wait_up(timeout=600)
        up = time.monotonic()
        slot, version = verified_boot(dev, signed)
        entered: dict[str, float] = {}  # stage -> when this boot first saw it
        at_boot = None  # the fraction durable when this boot first looked
        while pending:
            kind, arg = pending[0]
            if time.monotonic() > up + 400:
                raise AssertionError(f"{name}: the install never reached {kind} {arg}; cuts so far: {log}")
            if kind == "decode":
                break
            before = len(dev.serial())
            state = install_stage(dev, slot)
            if state is None:
                mark = before  # the machine reboots on its own: check the next boot
                if kind == "armed":
                    # It reboots on its own only once the trial is armed: that stage is over.
                    log.append((name, f"skipped {kind} {arg}", f"boot {slot} {version}", "rebooted into the trial"))
                    pending.pop(0)
                break
            stage, fraction, what = state
            last = stage
            if kind == "trial-grub" and STAGES.index(stage) < STAGES.index(kind):
                mark = before  # GRUB's announcement of the trial is still to come
                break
            entered.setdefault(stage, time.monotonic())
            at_boot = fraction if at_boot is None else at_boot
            if STAGES.index(stage) > STAGES.index(kind) or (kind == "download" and at_boot >= arg):
                # Passed before this boot looked: the next trigger.
                log.append((name, f"skipped {kind} {arg}", f"boot {slot} {version}", what))
                print(f"{time.monotonic() - began:6.0f} s", *log[-1], flush=True)
                pending.pop(0)
                continue
            if stage == kind and (fraction >= arg if kind == "download" else time.monotonic() - entered[stage] >= arg):
                reset(f"{what}, {time.monotonic() - up:.1f} s after the shell answered", slot, version)
                break
            time.sleep(0.3)


def test_power_cuts_spread_over_a_partition_install_leave_every_boot_verified(vm_fleet, images, tmp_path):
    """Two devices take 2.0.0 into partition B and have the power cut (QEMU killed
    and started again) at least 20 times between them, at every stage of the install:
    spread over the download, while the complete transfer is decoded into the
    partition and flushed, while it is read back, once the trial is armed, as GRUB
    starts the trial boot, while the agent checks the trial boot, and after the
    install ended. Every boot runs a slot whose root dm-verity checks against a signed
    release's root hash, and the install ends in the journal as committed (vm-cut-1: two
    trial attempts, one of them cut) or rolled back (vm-cut-2: its one attempt cut).

    vm-cut-1's last cut, seconds after its journal says committed, found GRUB's
    environment block on the FAT ESP not yet durable (GRUB booted slot A as
    "exhausted"; fixed in outpost_fsio::write_atomic)."""
    from concurrent.futures import ThreadPoolExecutor
    _, server, _ = vm_fleet
    signed = {v: Path(f"{images[v]}.verity").read_text().strip() for v in ("1.0.0", "2.0.0")}
    publish_slot(vm_fleet, images["2.0.0"], "2.0.0")
    # Each cut from the decode on costs the agent a new decode of the whole image (and
    # TCG is slow at it): few of them. The read-back and the armed trial are short
    # stages a look may miss; they are cut when seen. After a cut with every byte
    # durable, the next boot decodes as the agent starts: cut then, timed from its start.
    plans = {
        "vm-cut-1": ([("download", f) for f in (0.08, 0.21, 0.34, 0.47, 0.6, 0.73, 0.86)]
                     + [("read-back", 0.0), ("decode", 15.0), ("armed", 0.0), ("trial-grub", 0.0), ("done", 0.0)], 2),
        "vm-cut-2": ([("download", f) for f in (0.04, 0.16, 0.29, 0.42, 0.55, 0.68, 0.81, 0.94)]
                     + [("read-back", 0.0), ("decode", 25.0), ("armed", 0.0), ("trial-agent", 0.0), ("done", 0.0)], 1),
    }
    # The agents' bandwidth cap stretches the download of the 74 MB zstd target over
    # several boots, so that its cuts fall where the plan says rather than after it.
    devs = {name: device(vm_fleet, images, tmp_path / name, name=name,
                         extra="bandwidth_limit_bytes_per_sec = 3000000\n", trial_attempts=attempts)
            for name, (_, attempts) in plans.items()}
    log: list = []
    began = time.monotonic()
    try:
        with ThreadPoolExecutor(len(devs)) as pool:
            for f in [pool.submit(cut_through_an_install, n, devs[n], signed, plans[n][0], log) for n in plans]:
                f.result()
        cuts = [c for c in log if not c[1].startswith("skipped")]
        assert len(cuts) >= 20, log
        stages = {c[1] for c in cuts}
        assert stages >= {"download", "trial-grub", "trial-agent", "done"} and stages & {"decode", "read-back", "armed"}, log
        for name, dev in devs.items():
            spent = sum(1 for c in cuts if c[0] == name and c[1] in ("trial-grub", "trial-agent"))
            outcome = "rolled_back" if spent >= plans[name][1] else "committed"
            report = wait_report(server, name, "2.0.0", outcome, timeout=900)
            dev.wait_up(timeout=600)
            slot, version = verified_boot(dev, signed)
            phase = journal(dev)["phase"]["phase"]
            if outcome == "committed":
                assert (slot, version) == ("B", "2.0.0") and report["slot"] == "B", (slot, version, report)
                assert phase == "committed", phase
                # The slot holds exactly the signed image, read through its partition.
                length = images["2.0.0"].stat().st_size
                _, digest = dev.sh(f"head -c {length} /dev/vda3 | sha256sum", timeout=300)
                assert digest.split()[0] == hashlib.sha256(images["2.0.0"].read_bytes()).hexdigest()
            else:
                assert (slot, version) == ("A", "1.0.0"), (slot, version)
                assert phase == "rolled_back" and "attempts ran out" in (report.get("reason") or ""), (phase, report)
            for kind in dev.boots():
                assert kind in (("A", "normal"), ("B", "trial"), ("B", "normal"), ("A", "exhausted")), dev.boots()
    finally:
        for dev in devs.values():
            dev.stop()
        print(f"power cuts ({time.monotonic() - began:.0f} s):", *log, sep="\n  ")
