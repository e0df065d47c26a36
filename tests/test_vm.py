"""The agent on a virtual device that boots for real (tests/vm.py): OVMF, GRUB with
try-once boot counting, A/B root partitions, a swtpm TPM, systemd. GRUB decides what
boots; the agent installs into the inactive partition and reboots the machine.

Every boot runs under TCG (no KVM on this machine kind): about a minute each, so the
scenarios share boots where the story allows."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from conftest import BIN_DIR, list_reports
import vm

HARDWARE_CLASS = "qemu-x86_64"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Slot images (ext4 root filesystems with this build's agent package): the
    factory image 1.0.0, the update 2.0.0, and 3.0.0 whose kernel panics (no init)."""
    d = tmp_path_factory.mktemp("vm-images")
    agent = agent_deb()
    try:
        vm.image_sh("base", timeout=1200)
        vm.image_sh("esp")
        return {
            "1.0.0": vm.slot_image(d / "1.0.0.ext4", "1.0.0", agent),
            "2.0.0": vm.slot_image(d / "2.0.0.ext4", "2.0.0", agent),
            "3.0.0": vm.slot_image(d / "3.0.0.ext4", "3.0.0", agent, kind="panic"),
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


def publish_slot(fleet, image: Path, version: str) -> None:
    repo, server, token = fleet
    repo.cli("release", "publish", "--repo", repo.dir, "--firmware", image, "--hardware-class", HARDWARE_CLASS,
             "--version", version, "--key", repo.key("x86-firmware"), "--zstd", "--zstd-level", "3",
             "--server", server.url, "--token", token, timeout=300)


def device(fleet, images, tmp_path: Path, name: str = "vm-1") -> vm.VirtualDevice:
    repo, server, _ = fleet
    data = vm.data_partition(tmp_path / "data.ext4", {
        "agent.toml": vm.agent_toml(HARDWARE_CLASS, name).encode(),
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


def test_update_across_a_real_reboot_then_grub_falls_back_from_a_kernel_panic(vm_fleet, images, tmp_path):
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
        # The agent is the packaged one, a Type=notify service that said it was ready.
        _, unit = dev.sh("dpkg-query -W -f='${Status}\\n' outpost-agent; systemctl show -p Type -p ActiveState outpost-agent")
        for want in ("install ok installed", "Type=notify", "ActiveState=active"):
            assert want in unit, unit

        # 3.0.0's kernel finds no init and panics: nothing on the device can confirm
        # it. GRUB's count runs out and it boots the committed slot B again.
        publish_slot(vm_fleet, images["3.0.0"], "3.0.0")
        mark = len(dev.serial())
        dev.wait_serial(r"outpost: booting slot A \(trial\)", timeout=900, after=mark)
        dev.wait_serial(r"Kernel panic", timeout=300, after=mark)
        dev.wait_serial(r"outpost: booting slot B \(exhausted\)", timeout=300, after=mark)
        rolled = wait_report(server, "vm-1", "3.0.0", "rolled_back", timeout=600)
        assert "attempts ran out" in (rolled.get("reason") or ""), rolled
        assert dev.cmdline_slot() == "B"
        _, release = dev.sh("cat /etc/outpost-release")
        assert "OUTPOST_RELEASE=2.0.0" in release
        # The failed release is not tried again.
        time.sleep(20)
        assert dev.boots()[-1] == ("B", "exhausted"), dev.boots()
    finally:
        dev.stop()
