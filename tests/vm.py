"""The virtual device: QEMU (TCG) with OVMF, a swtpm TPM 2.0 attached as `tpm-crb`, and
a GPT disk (ESP with GRUB, root A, root B, data) built by testbeds/vm/image.sh.

The device reaches one port of the host's loopback, the server's, over QEMU user
networking in restricted mode: the guest's 10.0.2.100:80 is forwarded (socat) to
127.0.0.1:<server port>, and nothing else leaves the VM. Its first serial port (kernel, GRUB
and boot messages) is logged to `serial.log`; a second console (virtio, /dev/hvc0)
runs a root shell that `VirtualDevice.sh` drives; QMP resets or powers it off.

Used by tests/test_vm.py and scripts/main-job.sh (python3 tests/vm.py ...)."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE_SH = REPO_ROOT / "testbeds" / "vm" / "image.sh"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# The server as the guest sees it (forwarded to the host's 127.0.0.1:<server port>).
SERVER_FROM_GUEST = "10.0.2.100:80"
# Paths on the device (testbeds/vm/image.sh makes them).
GRUBENV = "/boot/efi/EFI/outpost/grubenv"
SLOT_DEVICES = {"A": "/dev/disk/by-partlabel/outpost-root-a", "B": "/dev/disk/by-partlabel/outpost-root-b"}


# Sent after ^C ahead of a probe: bash's readline drops what follows a ^C in the same
# read (one character, measured), so the probe's line starts with blanks it may lose.
PAD = " " * 8
# Under TCG, OVMF has been seen to spin in its DXE phase after the guest's own warm
# restart, printing nothing ever after (twice in one CI run: "reboot: Restarting
# system", then silence); a cold start of the same disk, variables and TPM state boots.
# A machine silent this long after a restart is power-cycled, as a board's supervisor
# would, said on stderr and counted in VirtualDevice.firmware_hangs. A warm restart
# reaches GRUB in 6-16 s.
FIRMWARE_SILENCE = 150.0


class VmError(Exception):
    pass


def image_sh(*args: str, timeout: float = 900) -> str:
    """testbeds/vm/image.sh; returns its stdout (a path for base/esp)."""
    res = subprocess.run(["bash", str(IMAGE_SH), *args], capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise VmError(f"image.sh {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res.stdout.strip()


def slot_image(out: Path, version: str, agent: Path, kind: str = "good") -> Path:
    """An ext4 root filesystem for a slot (the cached base, this agent,
    /etc/outpost-release) followed by its dm-verity hash tree."""
    image_sh("slot", str(out), version, str(agent), kind)
    return out


def verity_args(slot: Path) -> list[str]:
    """The `release publish` flags that sign a slot image's dm-verity root."""
    return Path(f"{slot}.verity-args").read_text().split()


def data_partition(out: Path, files: dict[str, bytes], mib: int = 128) -> Path:
    """The device's data partition (mounted at /var/lib/outpost): an ext4 image with `files`."""
    tree = out.parent / (out.name + ".d")
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    for name, content in files.items():
        p = tree / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
    out.unlink(missing_ok=True)
    res = subprocess.run(["mke2fs", "-q", "-t", "ext4", "-L", "outpost-data", "-d", str(tree), str(out), f"{mib}M"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise VmError(f"mke2fs of the data partition failed: {res.stderr}")
    return out


def agent_toml(hardware_class: str, device_id: str, *, extra: str = "", trial_attempts: int = 1,
               ca_certificates: str | None = None) -> str:
    """The agent's config on the data partition: GRUB boot control, partition slots;
    with `ca_certificates` (a file beside it), the server over TLS, trusted by that CA."""
    scheme = "https" if ca_certificates else "http"
    return (f'server_url = "{scheme}://{SERVER_FROM_GUEST}"\n'
            f'hardware_class = "{hardware_class}"\n'
            'state_dir = "agent"\n'  # the unit's StateDirectory (outpost/agent)
            'trusted_root = "root.json"\n'
            f'device_id = "{device_id}"\n'
            '\n[http]\ntimeout = "30s"\n'
            + (f'ca_certificates = "{ca_certificates}"\n' if ca_certificates else '') +
            '\n[install]\nboot_backend = "grub"\n'
            f'grub_env = "{GRUBENV}"\n'
            f'slot_a = "{SLOT_DEVICES["A"]}"\n'
            f'slot_b = "{SLOT_DEVICES["B"]}"\n'
            f'trial_attempts = {trial_attempts}\n'
            'check_interval = "5s"\n'
            + extra)


class VirtualDevice:
    """One QEMU virtual machine and its swtpm, in `workdir`."""

    def __init__(self, workdir: Path, disk: Path, server_port: int, *, memory_mib: int = 1024, cpus: int = 1) -> None:
        for tool in ("qemu-system-x86_64", "swtpm", "swtpm_setup", "socat"):
            if shutil.which(tool) is None:
                raise VmError(f"{tool} is not installed: bash scripts/setup.sh installs it")
        for f in (OVMF_CODE, OVMF_VARS):
            if not f.exists():
                raise VmError(f"{f} missing: bash scripts/setup.sh installs Debian's ovmf")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.disk = disk
        self.server_port = server_port
        self.memory = memory_mib
        # Emulated cores (TCG runs one host thread per core). One: with two, a boot took
        # about 15 % less, but OVMF once hung for good after the guest's own reboot
        # (nothing on the console after "reboot: Restarting system"), which with one
        # core has not been seen; and the tests run devices side by side instead.
        self.cpus = cpus
        self.tpm_dir = self.dir / "tpm"
        self.serial_log = self.dir / "serial.log"
        self.shell_sock = self.dir / "shell.sock"
        self.qmp_sock = self.dir / "qmp.sock"
        self.tpm_sock = self.tpm_dir / "ctrl.sock"
        self.vars = self.dir / "OVMF_VARS.fd"
        self.qemu: subprocess.Popen | None = None
        self.swtpm: subprocess.Popen | None = None
        self._shell: socket.socket | None = None
        self._buf = b""
        self.firmware_hangs = 0
        self._serial_seen = (-1, time.monotonic())
        if not self.tpm_dir.exists():
            self.tpm_dir.mkdir()
            # Manufactured like a real TPM: EK and EK certificate from swtpm's local CA.
            res = subprocess.run(["swtpm_setup", "--tpm2", "--tpmstate", str(self.tpm_dir), "--create-ek-cert",
                                  "--create-platform-cert", "--overwrite"], capture_output=True, text=True, timeout=120)
            if res.returncode != 0:
                raise VmError(f"swtpm_setup failed: {res.stdout}{res.stderr}")
        if not self.vars.exists():
            shutil.copyfile(OVMF_VARS, self.vars)

    # ---- power
    def start(self) -> None:
        """Powers on: swtpm first (QEMU connects to it), then QEMU."""
        self.tpm_sock.unlink(missing_ok=True)
        self.swtpm = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.tpm_dir}",
             "--ctrl", f"type=unixio,path={self.tpm_sock}", "--log", f"file={self.tpm_dir / 'swtpm.log'}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.tpm_sock.exists(), 10, "swtpm's control socket")
        for s in (self.shell_sock, self.qmp_sock):
            s.unlink(missing_ok=True)
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", str(self.memory), "-smp", str(self.cpus),
                "-nographic", "-nodefaults", "-no-user-config",
                "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,unit=1,file={self.vars}",
                "-drive", f"if=virtio,format=raw,file={self.disk},cache=unsafe",
                "-chardev", f"socket,id=chrtpm,path={self.tpm_sock}",
                "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0",
                "-chardev", f"file,id=ser0,path={self.serial_log},append=on", "-serial", "chardev:ser0",
                "-device", "virtio-serial",
                "-chardev", f"socket,id=sh,path={self.shell_sock},server=on,wait=off", "-device", "virtconsole,chardev=sh",
                "-netdev", f"user,id=n0,restrict=on,guestfwd=tcp:{SERVER_FROM_GUEST}-cmd:socat STDIO TCP:127.0.0.1:{self.server_port}",
                "-device", "virtio-net-pci,netdev=n0",
                "-qmp", f"unix:{self.qmp_sock},server=on,wait=off"]
        self.qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(self.dir / "qemu.out", "ab"),
                                     stderr=subprocess.STDOUT)
        wait_until(lambda: self.shell_sock.exists() and self.qmp_sock.exists(), 20, "QEMU's sockets")
        self._shell = None

    def power_cut(self) -> None:
        """Pulls the plug: QEMU is killed. What the guest had written to its disk stays
        (QEMU's writes are in the host's page cache); what was still in the guest's
        own memory is lost, as on a board whose disk has no volatile cache."""
        self._kill()

    def stop(self) -> None:
        self._kill()

    def _kill(self) -> None:
        if self._shell is not None:
            self._shell.close()
            self._shell = None
        for p in (self.qemu, self.swtpm):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        self.qemu = self.swtpm = None

    def qmp(self, command: str, **arguments) -> dict:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.qmp_sock))
            f = s.makefile("rwb")
            json.loads(f.readline())
            for msg in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
                f.write(json.dumps(msg).encode() + b"\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline())
                    if "return" in reply or "error" in reply:
                        break
            if "error" in reply:
                raise VmError(f"QMP {command}: {reply['error']}")
            return reply["return"]

    def reset(self) -> None:
        """The reset button: the machine restarts at once (what was not on disk is lost).
        The console's connection stays; what the last boot printed is dropped. Under
        TCG, OVMF has been seen to spin in its DXE phase after this, printing nothing,
        through further resets (a cold start of the same disk, variables and TPM state
        boots): the power-cut test uses power_cut and start."""
        self.qmp("system_reset")
        self._buf = b""

    # ---- observing
    def serial(self) -> str:
        return self.serial_log.read_text(errors="replace") if self.serial_log.exists() else ""

    def _watch_firmware(self) -> None:
        """Power-cycles a machine whose firmware hung after a warm restart (see
        FIRMWARE_SILENCE); called while waiting on the machine."""
        size = self.serial_log.stat().st_size if self.serial_log.exists() else 0
        now = time.monotonic()
        if size != self._serial_seen[0]:
            self._serial_seen = (size, now)
            return
        if now - self._serial_seen[1] < FIRMWARE_SILENCE or self.qemu is None:
            return
        with open(self.serial_log, "rb") as f:
            f.seek(max(0, size - 600))
            tail = f.read()
        restarted = tail.rfind(b"reboot: Restarting system")
        if restarted < 0 or max(tail.rfind(b"BdsDxe"), tail.rfind(b"outpost: booting")) > restarted:
            return
        self.firmware_hangs += 1
        print(f"vm {self.dir}: no firmware output {FIRMWARE_SILENCE:.0f} s after the guest restarted "
              f"(OVMF's hang after a warm reset under TCG): power-cycling (hang {self.firmware_hangs})", file=sys.stderr)
        self._kill()
        self.start()
        self._serial_seen = (size, time.monotonic())

    def wait_serial(self, pattern: str, timeout: float, after: int = 0) -> re.Match:
        """Waits for `pattern` (a regex) in the serial log past offset `after`."""
        rx = re.compile(pattern)
        found: list[re.Match] = []

        def seen() -> bool:
            if self.qemu is not None and self.qemu.poll() is not None:
                raise VmError(f"QEMU exited ({self.qemu.returncode}) while waiting for {pattern!r}: "
                              f"{(self.dir / 'qemu.out').read_text(errors='replace')[-2000:]}")
            m = rx.search(self.serial(), after)
            if m:
                found.append(m)
            else:
                self._watch_firmware()
            return bool(m)
        wait_until(seen, timeout, f"{pattern!r} on the serial console (log: {self.serial_log})", poll=0.5)
        return found[0]

    def boots(self) -> list[tuple[str, str]]:
        """(slot, kind) for every boot GRUB announced on the serial console so far."""
        return re.findall(r"outpost: booting slot ([AB]) \((normal|trial|exhausted)\)", self.serial())

    # ---- the root shell on /dev/hvc0
    def _connect(self) -> socket.socket:
        if self._shell is None:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(self.shell_sock))
            s.settimeout(0.5)
            self._shell, self._buf = s, b""
        return self._shell

    def _receive(self, s: socket.socket) -> None:
        """Appends what the console sent within half a second to the buffer (and to
        hvc0.log, the whole transcript of the console)."""
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            return
        if not chunk:
            self._shell = None
            return
        self._buf += chunk
        with open(self.dir / "hvc0.log", "ab") as f:
            f.write(chunk)

    def _transcript_tail(self) -> str:
        p = self.dir / "hvc0.log"
        return p.read_bytes()[-1500:].decode(errors="replace") if p.exists() else ""

    def sh(self, command: str, timeout: float = 60, check: bool = True) -> tuple[int, str]:
        """Runs `command` in the device's root shell; returns (exit status, output).

        Until the shell is known to read what is sent, only a probe goes out: ^C (which
        also ends any half-received line, say one whose start agetty or login flushed
        and whose tail opened a quote) and a line without quotes that prints a token.
        It is sent again every 2 seconds, since what comes before the login is lost,
        whole or in part. Once the token comes back the command is sent, once: every
        earlier probe was before it on the console's byte stream, so none of their ^C
        can reach the command, and it is never run twice."""
        deadline = time.monotonic() + timeout
        tok = uuid.uuid4().hex[:12]
        probe = f"\x03{PAD}printf R%sR\\\\n {tok}\n".encode()
        probe_rx = re.compile(rf"R{tok}R\r?\n".encode())
        line = (f"printf 'S%sS\\n' {tok}; ( {command} ) </dev/null 2>&1; printf 'E%sD%s\\n' {tok} $?\n").encode()
        start_rx = re.compile(rf"S{tok}S\r?\n".encode())
        end_rx = re.compile(rf"E{tok}D(\d+)".encode())
        probe_at = 0.0
        sent = False
        while time.monotonic() < deadline:
            if not sent:
                self._watch_firmware()
            s = self._connect()
            if not sent:
                if probe_rx.search(self._buf):
                    s.sendall(line)
                    sent = True
                elif time.monotonic() >= probe_at:
                    s.sendall(probe)
                    probe_at = time.monotonic() + 2
            self._receive(s)
            m0 = start_rx.search(self._buf)
            if m0:
                m1 = end_rx.search(self._buf, m0.end())
                if m1:
                    out = self._buf[m0.end():m1.start()].decode(errors="replace").replace("\r\n", "\n")
                    self._buf = self._buf[m1.end():]
                    rc = int(m1.group(1))
                    if check and rc != 0:
                        raise VmError(f"device command {command!r} exited {rc}:\n{out}")
                    return rc, out
        state = "sent, no end marker" if sent else "the shell never answered a probe"
        raise VmError(f"device command {command!r} did not finish within {timeout:.0f} s ({state}); "
                      f"the console's last output:\n{self._transcript_tail()}")

    def wait_up(self, timeout: float = 400) -> None:
        """Waits until the device's shell answers (GRUB, kernel, systemd, login)."""
        self.sh("true", timeout=timeout)

    def grubenv(self) -> dict[str, str]:
        _, out = self.sh(f"grep -a '^outpost_' {GRUBENV} || true")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def cmdline_slot(self) -> str:
        _, out = self.sh("cat /proc/cmdline")
        m = re.search(r"outpost\.slot=([AB])", out)
        if not m:
            raise VmError(f"the kernel command line names no slot: {out!r}")
        return m.group(1)


def wait_until(pred, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise VmError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)
