"""Measured-boot events beside the golden values (issue 18): a device of a class its
boot chain measures sends the TCG event log with its quote; the server keeps the
events the log matched and the operator sees them (`GET /api/v1/devices/{id}`,
`outpost device show`).

The loopback testbed has no firmware and no GRUB, so the test plays them: it writes
a crypto-agile event log of a GRUB boot (bootloader in PCR 4, GRUB's command line and
commands in PCR 8, kernel and initrd in PCR 9) and extends the device's swtpm with
the same digests, as firmware and GRUB would. The agent is the real one with
`[tpm] boot_event_log`, the quote is the swtpm's, the golden values are signed by
`outpost release publish --boot-*`. (The real boot is tests/test_vm.py's.)
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from pathlib import Path

from conftest import Device, OutpostServer, RunningAgent, assert_ok, run, sha256_hex

REPO = Path(__file__).resolve().parent.parent
EFI_IMAGE = REPO / "protocol/src/attest/testdata/small-pe32plus.efi"
EFI_AUTHENTICODE = (REPO / "protocol/src/attest/testdata/small-pe32plus.efi.authenticode-sha256").read_text().split()[0]
BOOT_EVENT_CLASS = '\n[attestation.classes.rpi4]\nboot_event_log = true\n'
CMDLINE = "/vmlinuz root=/dev/vda2 ro outpost.slot=A"
KERNEL, INITRD = b"a kernel " * 100, b"an initrd " * 100

EV_SEPARATOR, EV_IPL, EV_NO_ACTION, EV_EFI_BSA = 0x4, 0xD, 0x3, 0x80000003
ALG_SHA256 = 0x000B


class BootLog:
    """What firmware and GRUB write to the event log (TCG PC Client crypto-agile
    format, one SHA-256 bank) while they extend the TPM's PCRs."""

    def __init__(self) -> None:
        spec = b"Spec ID Event03\0" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 1) + struct.pack("<HH", ALG_SHA256, 32) + b"\0"
        self.bytes = struct.pack("<II20sI", 0, EV_NO_ACTION, bytes(20), len(spec)) + spec
        self.extends: list[tuple[int, str]] = []

    def event(self, pcr: int, event_type: int, data: bytes, digest: str) -> "BootLog":
        self.bytes += struct.pack("<III", pcr, event_type, 1) + struct.pack("<H", ALG_SHA256) + bytes.fromhex(digest)
        self.bytes += struct.pack("<I", len(data)) + data
        self.extends.append((pcr, digest))
        return self

    def grub_string(self, prefix: str, text: str) -> "BootLog":
        return self.event(8, EV_IPL, f"{prefix}{text}\0".encode(), sha256_hex(text.encode()))

    def grub_file(self, name: str, content: bytes) -> "BootLog":
        return self.event(9, EV_IPL, f"{name}\0".encode(), sha256_hex(content))

    def extend_into(self, tpm) -> None:
        for pcr, digest in self.extends:
            assert_ok(tpm.tool("tpm2_pcrextend", f"{pcr}:sha256={digest}"))
        self.extends = []


def golden_boot() -> BootLog:
    log = BootLog()
    log.event(4, EV_EFI_BSA, b"\0" * 32, EFI_AUTHENTICODE)
    log.event(4, EV_SEPARATOR, b"\0\0\0\0", sha256_hex(b"\0\0\0\0"))
    log.grub_string("grub_cmd: ", "set root=(hd0,gpt2)")
    log.grub_string("grub_cmd: ", f"linux {CMDLINE}")
    log.grub_file("/vmlinuz", KERNEL)
    log.grub_string("kernel_cmdline: ", CMDLINE)
    log.grub_string("grub_cmd: ", "initrd /initrd.img")
    log.grub_file("/initrd.img", INITRD)
    return log



class BootChainFleet:
    """A server judging class rpi4 by its boot chain, the repository pushed to it, the
    boot files the golden values are computed from, and one device with its swtpm
    extended and its event log written as after a golden boot (slot A holds `image`)."""

    def __init__(self, tmp_path: Path, outpost_repo, swtpm_factory, image: bytes, install: dict | None = None) -> None:
        self.repo = outpost_repo
        self.server = OutpostServer(tmp_path, outpost_repo, measurement=BOOT_EVENT_CLASS)
        self.token = self.server.token()
        self.server.start()
        outpost_repo.cli("repo", "push", "--repo", outpost_repo.dir, "--server", self.server.url, "--token", self.token)
        boot = tmp_path / "boot"
        boot.mkdir()
        (boot / "vmlinuz").write_bytes(KERNEL)
        (boot / "initrd.img").write_bytes(INITRD)
        self.golden = ("--boot-efi", EFI_IMAGE, "--boot-kernel", boot / "vmlinuz", "--boot-initrd", boot / "initrd.img",
                       "--boot-cmdline", CMDLINE)
        self.tpm = swtpm_factory("tpm")
        self.log = golden_boot()
        self.log.extend_into(self.tpm)
        self.log_file = tmp_path / "binary_bios_measurements"
        self.log_file.write_bytes(self.log.bytes)
        self.dev = Device(tmp_path / "device", self.server.url, outpost_repo.root1, device_id="device",
                          tpm={"tcti": self.tpm.tcti, "boot_event_log": str(self.log_file)}, install=install)
        self.dev.slot_path("A").parent.mkdir(parents=True, exist_ok=True)
        self.dev.slot_path("A").write_bytes(image)
        self.op_token = self.server.token("ops", "operator")

    def publish(self, image: bytes, version: str, *extra: str) -> None:
        self.repo.publish(image, version, server=self.server, token=self.token, extra=(*self.golden, *extra))

    def agent(self, *args: str):
        return run([self.dev.exe, "--config", self.dev.config, "--json", *args], timeout=60)

    def enroll(self) -> str:
        made = assert_ok(self.repo.cli("--json", "device", "token", "create", "--hardware-class", "rpi4",
                                       "--server", self.server.url, "--token", self.op_token))
        return json.loads(assert_ok(self.agent("enroll", "--token", json.loads(made.stdout)["token"])).stdout)["device_id"]

    def ops(self, *args: str):
        return assert_ok(self.repo.cli(*args, "--server", self.server.url, "--token", self.op_token))


def test_an_attested_boot_is_shown_beside_the_golden_values_and_a_failed_one_keeps_nothing(tmp_path, outpost_repo, swtpm_factory):
    image = hashlib.sha256(b"v1").digest() * 2048
    fleet = BootChainFleet(tmp_path, outpost_repo, swtpm_factory, image)
    log, log_file, tpm, agent = fleet.log, fleet.log_file, fleet.tpm, fleet.agent
    try:
        fleet.publish(image, "1.0.0")
        device_id = fleet.enroll()
        verdict = json.loads(assert_ok(agent("checkin")).stdout.strip().splitlines()[-1])
        assert verdict["verdict"] == "attested", verdict

        show = lambda *a: fleet.ops(*a, "device", "show", device_id)
        detail = json.loads(show("--json").stdout)
        attested = detail["attestations"][0]
        assert attested["verdict"] == "attested" and attested["version"] == "1.0.0", attested
        events = attested["boot_events"]["events"]
        assert attested["boot_events"]["omitted"] == 0
        assert [(e["record"], e["pcr"], e["golden"]) for e in events] == [
            (1, 4, {"kind": "bootloader", "name": "small-pe32plus.efi"}),
            (2, 4, {"kind": "firmware_string"}),
            (3, 8, {"kind": "grub_command"}),
            (4, 8, {"kind": "grub_command"}),
            (6, 8, {"kind": "kernel_cmdline"}),
            (7, 8, {"kind": "grub_command"}),
            (5, 9, {"kind": "kernel", "name": "vmlinuz"}),
            (8, 9, {"kind": "initrd", "name": "initrd.img"}),
        ], events
        kernel = next(e for e in events if e["golden"]["kind"] == "kernel")
        assert kernel == {"record": 5, "pcr": 9, "event_type": "EV_IPL", "text": "/vmlinuz", "sha256": sha256_hex(KERNEL),
                          "golden": {"kind": "kernel", "name": "vmlinuz"}}
        text = show().stdout
        rows = {line.split()[0]: line for line in text.splitlines() if line[:1].isdigit()}
        assert "kernel vmlinuz" in rows["5"] and sha256_hex(KERNEL)[:12] in rows["5"], text
        assert "bootloader small-pe32plus.efi" in rows["1"] and "EV_EFI_BOOT_SERVICES_APPLICATION" in rows["1"], text
        assert rows["6"].split()[4:] == ["kernel", "command", "line", "kernel_cmdline:", *CMDLINE.split()], text
        assert "firmware action/separator" in rows["2"] and "EV_SEPARATOR" in rows["2"], text

        # A log that claims a golden boot the TPM did not record (an event appended to
        # the file, not extended): it does not replay to the quote; nothing is kept.
        golden_file = log.bytes
        forged = BootLog()
        forged.bytes = golden_file
        forged.grub_file("/initrd.img", INITRD)
        log_file.write_bytes(forged.bytes)
        verdict = json.loads(agent("checkin").stdout.strip().splitlines()[-1])
        assert verdict["verdict"] == "failed" and "replay" in verdict["reason"], verdict
        assert json.loads(show("--json").stdout)["attestations"][0]["boot_events"] is None
        log_file.write_bytes(golden_file)
        verdict = json.loads(agent("checkin").stdout.strip().splitlines()[-1])
        assert verdict["verdict"] == "attested", verdict
        assert json.loads(show("--json").stdout)["attestations"][0]["boot_events"] == attested["boot_events"]

        # Root loads another kernel (GRUB measures it into PCR 9 and the log says so):
        # the check-in fails, names the event, and keeps no events; the operator still
        # sees the last attested boot, labelled with its time.
        log.grub_file("/vmlinuz", b"root's kernel")
        log.extend_into(tpm)
        log_file.write_bytes(log.bytes)
        verdict = json.loads(agent("checkin").stdout.strip().splitlines()[-1])
        assert verdict["verdict"] == "failed" and "record 9" in verdict["reason"], verdict
        detail = json.loads(show("--json").stdout)
        assert detail["attestations"][0]["verdict"] == "failed" and detail["attestations"][0]["boot_events"] is None, detail
        text = show().stdout
        newest_attested = next(a for a in detail["attestations"] if a["verdict"] == "attested")
        assert f"measured boot of the attested check-in at {newest_attested['at']}" in text and "QUARANTINED" in text, text
    finally:
        fleet.server.stop()


def test_an_enrolled_device_of_a_boot_chain_class_installs_the_zstd_release_a_rollout_assigns(tmp_path, outpost_repo, swtpm_factory):
    """The path the virtual device's demo takes: a boot-chain device, attested as its
    factory release, is assigned a newer zstd-encoded release by a rollout; its next
    round installs it (the file testbed's reboot is a re-exec, so the boot log and the
    PCRs stay the factory boot's: only the install is checked here)."""
    v1 = hashlib.sha256(b"v1").digest() * 2048
    v2 = hashlib.sha256(b"v2").digest() * 2048
    fleet = BootChainFleet(tmp_path, outpost_repo, swtpm_factory, v1, install={"check_interval": "1s"})
    dev = fleet.dev
    try:
        fleet.publish(v1, "1.0.0", "--zstd")
        # The daemon runs from power-on, as on a device; it is enrolled while it runs.
        daemon = RunningAgent([dev.exe, "--config", dev.config, "--json", "run"], tmp_path / "daemon.out", tmp_path / "daemon.err")
        try:
            device_id = fleet.enroll()
            until(lambda: '"verdict":"attested"' in (tmp_path / "daemon.out").read_text().replace(" ", ""), 60, "an attested check-in")
            show = lambda: json.loads(fleet.ops("--json", "device", "show", device_id).stdout)
            # What it runs is named by the image's digest (as an agent measures it), not
            # by the digest of the zstd file it was shipped in.
            assert show()["device"]["image_sha256"] == sha256_hex(v1), show()["device"]
            fleet.publish(v2, "2.0.0", "--zstd")
            made = fleet.ops("rollout", "create", "--version", "2.0.0", "--hardware-class", "rpi4", "--waves", "100", "--soak", "0s",
                             "--failure-threshold", "0.5", "--success-threshold", "1", "--min-devices", "1", "--start", "--json")
            rollout = lambda: json.loads(fleet.ops("rollout", "status", json.loads(made.stdout)["id"], "--json").stdout)
            until(lambda: dev.slot_path("B").exists() and dev.slot_path("B").read_bytes()[:len(v2)] == v2, 60,
                  "2.0.0 in slot B", lambda: (tmp_path / "daemon.err").read_text()[-4000:])
            # The file testbed commits on its re-exec; the rollout hears of it.
            until(lambda: (dev.journal() or {}).get("running", {}).get("version") == "2.0.0", 60, "2.0.0 committed",
                  lambda: (tmp_path / "daemon.err").read_text()[-4000:])
            # The rollout hears of it in the next attested check-in.
            until(lambda: rollout()["state_name"] == "completed", 60, "completed rollout", lambda: json.dumps(rollout()))
            assert (rollout()["waves"][0]["assigned"], rollout()["waves"][0]["healthy"]) == (1, 1), rollout()
        finally:
            daemon.power_cut()
    finally:
        fleet.server.stop()


def until(pred, timeout: float, what: str, detail=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s: {detail()}")
        time.sleep(0.5)
