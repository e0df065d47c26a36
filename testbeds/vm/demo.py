#!/usr/bin/env python3
"""The main job's virtual device (scripts/main-job.sh): one QEMU machine with OVMF,
GRUB, A/B root partitions under dm-verity and a swtpm TPM, on the demo's server.

It enrolls (EK certificate from swtpm's local CA), checks in attested by its boot
chain (the firmware's TCG event log against the golden values signed into 1.0.0),
takes 2.0.0 from a rollout into partition B, really reboots, GRUB trial-boots B, the
agent commits, and the next check-in is attested as 2.0.0. Then `outpost device
show` prints the measured-boot events beside the golden values they matched.

Prints a summary on stdout; progress on stderr; exits non-zero on any failure."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "tests"))
import vm  # noqa: E402  (the VM harness the tests use)

HARDWARE_CLASS = "qemu-x86_64"
EVENT_LOG = "/sys/kernel/security/tpm0/binary_bios_measurements"


def log(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


class Demo:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.cli_bin = Path(a.bin) / "outpost"
        self.work = Path(a.work)
        self.work.mkdir(parents=True, exist_ok=True)

    def cli(self, *args: str, operator: bool = True, timeout: float = 600) -> str:
        token = self.a.operator_token if operator else self.a.pipeline_token
        argv = [str(self.cli_bin), *args, "--server", self.a.server_url, "--token", token]
        env = {**os.environ, **({"OUTPOST_CA_FILE": self.a.ca_file} if self.a.ca_file else {})}
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        if res.returncode != 0:
            raise SystemExit(f"ERROR: outpost {' '.join(args[:3])} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def publish(self, slot: Path, version: str) -> None:
        golden = vm.image_sh("golden-args", str(slot)).splitlines()
        self.cli("release", "publish", "--repo", self.a.repo, "--firmware", str(slot), "--hardware-class", HARDWARE_CLASS,
                 "--version", version, "--key", self.a.key, "--zstd", "--zstd-level", "3", *golden, operator=False)

    def device(self, device_id: str) -> dict:
        return json.loads(self.cli("device", "show", device_id, "--json"))

    def wait_device(self, device_id: str, what: str, pred, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.device(device_id)
            if pred(shown):
                return shown
            if time.monotonic() > deadline:
                raise SystemExit(f"ERROR: device {device_id} did not reach '{what}' within {timeout:.0f} s: {json.dumps(shown)[:2000]}")
            time.sleep(3)

    def run(self) -> None:
        agent_deb = Path(self.a.agent_deb)
        log("building the device's images (base and ESP cached under /var/cache/outpost-vm)")
        vm.image_sh("base", timeout=1800)
        vm.image_sh("esp")
        slots = {v: vm.slot_image(self.work / f"root-{v}.img", v, agent_deb) for v in ("1.0.0", "2.0.0")}
        self.publish(slots["1.0.0"], "1.0.0")
        log(f"published 1.0.0 for {HARDWARE_CLASS}: root filesystem + dm-verity tree, golden boot values signed")
        tpm = '\n[tpm]\ntcti = "device:/dev/tpmrm0"\n' f'boot_event_log = "{EVENT_LOG}"\n'
        files = {"root.json": Path(self.a.root).read_bytes()}
        if self.a.ca_file:
            # The server over TLS (its certificate names 10.0.2.100, where the guest
            # reaches it), trusted by the fleet's CA alone.
            files["ca.pem"] = Path(self.a.ca_file).read_bytes()
        files["agent.toml"] = vm.agent_toml(HARDWARE_CLASS, "vm-demo", extra=tpm,
                                            ca_certificates="ca.pem" if self.a.ca_file else None).encode()
        data = vm.data_partition(self.work / "data.ext4", files)
        disk = self.work / "disk.raw"
        vm.image_sh("disk", str(disk), str(slots["1.0.0"]), str(data))
        dev = vm.VirtualDevice(self.work / "machine", disk, self.a.server_port)
        log(f"powering on (QEMU TCG + OVMF + swtpm); serial console: {dev.serial_log}")
        started = time.monotonic()
        dev.start()
        try:
            self.drive(dev, slots, started)
        except (SystemExit, vm.VmError):
            self.tell_agent_log(dev)
            raise
        finally:
            dev.stop()

    @staticmethod
    def tell_agent_log(dev: vm.VirtualDevice) -> None:
        """On a failure: the agent's own log from inside the machine, when its shell
        still answers (the serial console has only the boot)."""
        try:
            _, out = dev.sh("journalctl -b -u outpost-agent --no-pager | tail -n 60", timeout=60, check=False)
        except vm.VmError as e:
            out = f"(the device's shell did not answer: {e})"
        print(f"  the agent's log on the device (serial console: {dev.serial_log}):", file=sys.stderr)
        for line in out.splitlines():
            print(f"    {line}", file=sys.stderr)

    def drive(self, dev: vm.VirtualDevice, slots: dict[str, Path], started: float) -> None:
        dev.wait_up(timeout=900)
        log(f"up after {time.monotonic() - started:.0f} s; enrolling with a one-time token")
        token = json.loads(self.cli("device", "token", "create", "--hardware-class", HARDWARE_CLASS, "--ttl", "15m", "--json"))["token"]
        _, out = dev.sh(f"outpost-agent --config /var/lib/outpost/agent.toml --json enroll --token {token}", timeout=180)
        device_id = next(json.loads(l) for l in out.splitlines() if l.startswith("{"))["device_id"]
        shown = self.wait_device(device_id, "attested", lambda d: d["device"]["attestation"] == "attested", 600)
        if shown["device"]["version"] != "1.0.0":
            raise SystemExit(f"ERROR: {device_id} was attested as {shown['device']['version']}, not the factory 1.0.0")
        log(f"{device_id}: attested by its boot chain as 1.0.0 (its event log matched 1.0.0's golden values)")
        mark = len(dev.serial())
        self.publish(slots["2.0.0"], "2.0.0")
        log("published 2.0.0 (its own dm-verity root, so its own golden command lines)")
        rollout = json.loads(self.cli("rollout", "create", "--version", "2.0.0", "--hardware-class", HARDWARE_CLASS, "--waves", "100",
                                      "--soak", "0s", "--success-threshold", "1", "--failure-threshold", "0.5", "--min-devices", "1",
                                      "--start", "--json"))
        log(f"rollout {rollout['id']}: 2.0.0 to {HARDWARE_CLASS}; the agent streams it into partition B and reboots the machine")
        dev.wait_serial(r"outpost: booting slot B \(trial\)", timeout=1200, after=mark)
        log(f"GRUB trial-boots slot B ({time.monotonic() - started:.0f} s after power-on)")
        shown = self.wait_device(device_id, "attested as 2.0.0",
                                 lambda d: d["device"]["version"] == "2.0.0" and d["device"]["attestation"] == "attested", 900)
        committed = time.monotonic() - started
        _, cmdline = dev.sh("cat /proc/cmdline")
        _, release = dev.sh("cat /etc/outpost-release")
        if "OUTPOST_RELEASE=2.0.0" not in release or "outpost.slot=B" not in cmdline:
            raise SystemExit(f"ERROR: the device runs {release.strip()!r} with {cmdline.strip()!r}, not 2.0.0 from slot B")
        table = self.cli("device", "show", device_id)
        print(f"Virtual device {device_id} (QEMU TCG, OVMF, GRUB, swtpm as tpm-crb; log {dev.serial_log})")
        print(f"  boots     {', '.join(f'{s} ({k})' for s, k in dev.boots())}")
        print(f"  2.0.0     streamed into partition B, real reboot, GRUB trial boot, committed and attested "
              f"{committed:.0f} s after power-on")
        print(f"  cmdline   {cmdline.strip()}")
        print("  outpost device show:")
        for line in table.splitlines():
            print(f"    {line}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin", required=True, help="directory with the outpost CLI")
    p.add_argument("--server-url", required=True)
    p.add_argument("--server-port", type=int, required=True)
    p.add_argument("--ca-file", help="the CA of the server's TLS certificate (the device then speaks https); "
                                     "the CLI reads OUTPOST_CA_FILE")
    p.add_argument("--operator-token", required=True)
    p.add_argument("--pipeline-token", required=True)
    p.add_argument("--repo", required=True)
    p.add_argument("--root", required=True, help="the repository's first root.json (the device's trust anchor)")
    p.add_argument("--key", required=True, help="the key of the role that signs firmware/qemu-x86_64/*/*")
    p.add_argument("--agent-deb", required=True)
    p.add_argument("--work", required=True)
    try:
        Demo(p.parse_args()).run()
    except vm.VmError as e:
        raise SystemExit(f"ERROR: {e}")


if __name__ == "__main__":
    main()
