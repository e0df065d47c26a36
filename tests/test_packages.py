"""The Debian packages: outpost-agent, outpost-server and outpost (scripts/packages.sh).

scripts/test.sh builds them from the debug build into target/debian (Debian revision
1) and a second set with revision 2 into target/debian/revision-2, the upgrade; set
OUTPOST_DEB_DIR to look elsewhere. Checked: their metadata and contents, their
maintainer scripts, their systemd units (systemd-analyze verify), that the installed
binaries accept the shipped configuration files, and install -> upgrade -> remove ->
purge inside a Debian 12 chroot.

The chroot is a copy (cp -a, one per test, deleted after it) of a cached minimal
Debian 12 made by scripts/deb-chroot.sh (debootstrap --variant=minbase bookworm plus
the packages' dependencies and systemd, as on a device image; the cache is never
changed); install -> upgrade -> remove -> purge also runs in a copy of the virtual
device's own image root (testbeds/vm/image.sh base, before its slot images get the
agent). Nothing is mounted into it. No systemd runs there, as when an image is
built: the maintainer scripts enable the units (symlinks) and start or restart them
only where /run/systemd/system exists; there, deb-systemd-invoke asks
/usr/sbin/policy-rc.d first, which the tests use to record what would have been
started (exit 101: "not now")."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import Result, assert_ok, run

REPO_ROOT = Path(__file__).resolve().parent.parent
DEB_DIR = Path(os.environ.get("OUTPOST_DEB_DIR", REPO_ROOT / "target" / "debian"))
UPGRADE_DIR = DEB_DIR / "revision-2"
PACKAGES = ("outpost-agent", "outpost-server", "outpost")
SERVICES = ("outpost-agent", "outpost-server")
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}

RECORDING_POLICY_RC_D = """#!/bin/sh
# Test double of the image builder's policy: record what the maintainer scripts would
# start, start nothing (101: action forbidden).
echo "$*" >>/var/log/policy-rc.d.log
exit 101
"""


def deb(name: str, directory: Path = DEB_DIR) -> Path:
    found = sorted(directory.glob(f"{name}_*_amd64.deb"))
    if len(found) != 1:
        pytest.fail(f"expected one {name}_*_amd64.deb in {directory}, found {[p.name for p in found]}: build them "
                    f"with scripts/packages.sh (scripts/test.sh does), or set OUTPOST_DEB_DIR", pytrace=False)
    return found[0]


def field(path: Path, name: str) -> str:
    return assert_ok(run(["dpkg-deb", "--field", path, name])).stdout.strip()


def depends(path: Path) -> dict[str, str]:
    """Depends: package name -> its version constraint ("" without one); the first of
    alternatives."""
    out = {}
    for entry in filter(None, (e.strip() for e in field(path, "Depends").split(","))):
        m = re.fullmatch(r"([a-z0-9][a-z0-9+.-]*)(?:\s*\(([^)]*)\))?", entry.split("|")[0].strip())
        assert m, f"unparsable dependency {entry!r} of {path.name}"
        out[m.group(1)] = m.group(2) or ""
    return out


def control_member(path: Path, member: str) -> str | None:
    res = run(["dpkg-deb", "--info", path, member])
    return res.stdout if res.returncode == 0 else None


def contents(path: Path) -> dict[str, str]:
    """Path in the package -> its mode string (dpkg-deb -c)."""
    out = {}
    for line in assert_ok(run(["dpkg-deb", "--contents", path])).stdout.splitlines():
        parts = line.split()
        out[parts[5].removeprefix(".")] = parts[0]
    return out


def test_package_metadata_and_contents():
    agent, server, cli = (deb(p) for p in PACKAGES)
    for path, name in zip((agent, server, cli), PACKAGES):
        assert field(path, "Package") == name
        assert field(path, "Version") == "0.1.0-1"
        assert field(path, "Architecture") == "amd64"
        assert "libc6" in depends(path), depends(path)
    # dpkg-shlibdeps found the TPM software stack the agent links; the others link
    # nothing of it.
    assert {"libtss2-esys-3.0.2-0", "libtss2-tctildr0", "libtss2-mu0"} <= depends(agent).keys(), depends(agent)
    assert not any(d.startswith("libtss2") for d in [*depends(server), *depends(cli)])
    assert "init-system-helpers" in depends(agent) and "init-system-helpers" in depends(server)
    assert "passwd" in depends(server), "postinst makes the system user with useradd"

    assert control_member(agent, "conffiles").split() == ["/etc/outpost/agent.toml"]
    assert control_member(server, "conffiles").split() == ["/etc/outpost/server.toml"]
    assert control_member(cli, "conffiles") is None, "the offline CLI has no configuration"

    for path, binary_name, unit in ((agent, "outpost-agent", "outpost-agent.service"),
                                    (server, "outpost-server", "outpost-server.service"), (cli, "outpost", None)):
        files = contents(path)
        assert files[f"/usr/bin/{binary_name}"] == "-rwxr-xr-x", files
        units = [f for f in files if f.startswith("/usr/lib/systemd/system/") and not f.endswith("/")]
        assert units == ([f"/usr/lib/systemd/system/{unit}"] if unit else []), units
    assert contents(agent)["/etc/outpost/agent.toml"] == "-rw-r--r--"
    assert contents(server)["/etc/outpost/server.toml"] == "-rw-r--r--"


def test_the_upgrade_packages_are_newer():
    for name in PACKAGES:
        old, new = field(deb(name), "Version"), field(deb(name, UPGRADE_DIR), "Version")
        assert_ok(run(["dpkg", "--compare-versions", new, "gt", old]))


def test_maintainer_scripts_are_complete_shell():
    for name in SERVICES:
        path = deb(name)
        for script in ("postinst", "prerm", "postrm"):
            text = control_member(path, script)
            assert text is not None, f"{name} has no {script}"
            assert "#DEBHELPER#" not in text, f"{name} {script}: cargo-deb left its token"
            assert_ok(run(["sh", "-n", "-c", text]))
        assert "deb-systemd-helper enable outpost" in control_member(path, "postinst")
        assert "[ -d /run/systemd/system ]" in control_member(path, "postinst"), "starts only where systemd runs"


class Chroot:
    """A copy of the cached Debian 12 tree; commands run in it with chroot(8)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def run(self, *argv: str | Path, timeout: float = 180) -> Result:
        return run(["chroot", self.root, *argv], timeout=timeout, env=CHROOT_ENV)

    def dpkg(self, *args: str | Path) -> Result:
        """dpkg in the chroot; .deb paths on the host are copied in first."""
        inside = []
        for a in args:
            if isinstance(a, Path):
                shutil.copy(a, self.path("/tmp") / a.name)
                a = f"/tmp/{a.name}"
            inside.append(a)
        return assert_ok(self.run("dpkg", *inside))

    def status(self, package: str) -> str:
        res = self.run("dpkg-query", "--show", "--showformat", "${Status} ${Version}", package)
        return res.stdout.strip() if res.returncode == 0 else "not known"

    def record_policy_rc_d(self) -> Path:
        script = self.path("/usr/sbin/policy-rc.d")
        script.write_text(RECORDING_POLICY_RC_D)
        script.chmod(0o755)
        return self.path("/var/log/policy-rc.d.log")

    def owner(self, inside: str) -> str:
        return assert_ok(self.run("stat", "--format", "%U:%G %a", inside)).stdout.strip()


@pytest.fixture(scope="module")
def base_root() -> Path:
    """The cached tree: minbase, systemd (not running: this is an image) and every
    dependency the packages name, so dpkg -i needs no network."""
    needed = {"systemd"}
    for name in PACKAGES:
        needed |= depends(deb(name)).keys()
    needed -= set(PACKAGES)
    res = run(["bash", REPO_ROOT / "scripts" / "deb-chroot.sh", *sorted(needed)], timeout=1200)
    if res.returncode != 0:
        pytest.fail("scripts/deb-chroot.sh could not make the Debian 12 tree (root, debootstrap and, the first "
                    "time, network access to deb.debian.org are needed):\n" + res.describe(), pytrace=False)
    return Path(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def device_image_root() -> Path:
    """The virtual device's root filesystem as testbeds/vm/image.sh builds it before
    the agent goes in (cached; the VM tests use the same one)."""
    import vm
    try:
        return Path(vm.image_sh("base", timeout=1800))
    except vm.VmError as e:
        pytest.fail(f"testbeds/vm/image.sh base could not make the device image's root: {e}", pytrace=False)


def copied(base: Path, tmp_path: Path):
    root = tmp_path / "root"
    assert_ok(run(["cp", "-a", base, root], timeout=300))
    yield Chroot(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def chroot(base_root, tmp_path):
    yield from copied(base_root, tmp_path)


@pytest.fixture(params=["debian-12", "device-image"])
def image_chroot(request, tmp_path):
    """The cached Debian 12 tree, and the virtual device's own image root."""
    base = request.getfixturevalue("base_root" if request.param == "debian-12" else "device_image_root")
    yield from copied(base, tmp_path)


def read_log(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_install_upgrade_remove_purge_in_a_debian_chroot_and_in_the_device_image(image_chroot):
    c = image_chroot
    asked = c.record_policy_rc_d()
    wants = c.path("/etc/systemd/system/multi-user.target.wants")

    # Install into an image being built: no systemd runs, nothing is started.
    c.dpkg("--install", *(deb(p) for p in PACKAGES))
    for name in PACKAGES:
        assert c.status(name) == "install ok installed 0.1.0-1"
    for unit in SERVICES:
        assert (wants / f"{unit}.service").is_symlink(), f"{unit} is enabled for the image's first boot"
    assert read_log(asked) == [], "nothing is started (or even asked for) where systemd does not run"
    assert "/usr/sbin/nologin" in assert_ok(c.run("getent", "passwd", "outpost")).stdout
    assert c.owner("/var/lib/outpost/agent") == "root:root 700"
    assert c.owner("/var/lib/outpost/server") == "outpost:outpost 750"
    assert c.owner("/etc/outpost/keys") == "root:outpost 750"
    assert "0.1.0" in assert_ok(c.run("outpost", "--version")).stdout

    # What an operator and the daemons leave behind.
    agent_state = c.path("/var/lib/outpost/agent/journal.json")
    agent_state.write_text('{"state": "committed"}')
    server_state = c.path("/var/lib/outpost/server/outpost.db")
    server_state.write_bytes(b"SQLite format 3\0 and rows")
    agent_conf = c.path("/etc/outpost/agent.toml")
    edited = agent_conf.read_text().replace('hardware_class = "generic-x86-64"', 'hardware_class = "gateway-x86"')
    assert edited != agent_conf.read_text()
    agent_conf.write_text(edited)
    server_conf = c.path("/etc/outpost/server.toml").read_bytes()

    # Upgrade where /run/systemd/system exists but no systemd answers (a chroot on a
    # running host): the scripts ask to restart the services (policy-rc.d says not
    # now) and do not fail on systemctl's errors; nothing is stopped first.
    c.path("/run/systemd/system").mkdir(parents=True)
    c.dpkg("--install", *(deb(p, UPGRADE_DIR) for p in PACKAGES))
    for name in PACKAGES:
        assert c.status(name) == "install ok installed 0.1.0-2"
    assert read_log(asked) == [f"{u}.service restart" for u in SERVICES], read_log(asked)
    assert agent_state.read_text() == '{"state": "committed"}'
    assert server_state.read_bytes() == b"SQLite format 3\0 and rows"
    assert agent_conf.read_text() == edited, "the operator's edit survives the upgrade"
    assert c.path("/etc/outpost/server.toml").read_bytes() == server_conf
    assert sorted(p.name for p in c.path("/etc/outpost").iterdir()) == ["agent.toml", "keys", "server.toml"]

    # Remove: programs and units go; the services are stopped first; state and
    # configuration stay.
    c.dpkg("--remove", *PACKAGES)
    assert read_log(asked)[2:] == [f"{u}.service stop" for u in SERVICES], read_log(asked)
    for name in SERVICES:
        assert c.status(name) == "deinstall ok config-files 0.1.0-2"
        assert not c.path(f"/usr/bin/{name}").exists()
        assert not c.path(f"/usr/lib/systemd/system/{name}.service").exists()
    assert c.status("outpost") == "not known" or c.status("outpost").startswith("deinstall ok not-installed")
    assert agent_state.read_text() == '{"state": "committed"}'
    assert server_state.exists()
    assert agent_conf.read_text() == edited

    # Purge: state, configuration and the units' enablement go.
    c.dpkg("--purge", *PACKAGES)
    for name in PACKAGES:
        assert c.status(name) in ("not known", "unknown ok not-installed "), c.status(name)
    assert not c.path("/var/lib/outpost").exists()
    assert not c.path("/etc/outpost").exists()
    left = [str(p) for p in c.path("/etc/systemd").rglob("outpost*")]
    left += [str(p) for p in c.path("/var/lib/systemd/deb-systemd-helper-enabled").rglob("outpost*")]
    assert left == [], left


def test_install_does_not_fail_where_systemctl_cannot_reach_systemd(chroot):
    """/run/systemd/system exists, no policy-rc.d, no systemd to talk to: the scripts
    try to start the services and carry on when systemctl fails."""
    c = chroot
    c.path("/run/systemd/system").mkdir(parents=True)
    res = c.dpkg("--install", *(deb(p) for p in PACKAGES))
    assert "Failed to connect to bus" in res.stderr or "not been booted with systemd" in res.stderr, res.describe()
    for name in PACKAGES:
        assert c.status(name) == "install ok installed 0.1.0-1"


def test_the_installed_binaries_accept_the_shipped_configuration(chroot):
    """The shipped files parse: the binaries get past loading them to what is not
    provisioned yet. The same files with one unknown key are refused, so the check
    tells the two apart."""
    c = chroot
    c.dpkg("--install", *(deb(p) for p in PACKAGES))
    res = c.run("outpost-agent", "--config", "/etc/outpost/agent.toml", "policy", "status")
    assert res.returncode == 1 and "no network policy is enforced" in res.stderr, res.describe()
    res = c.run("outpost-server", "--config", "/etc/outpost/server.toml", "serve")
    assert res.returncode == 1 and "/etc/outpost/keys/snapshot.key" in res.stderr, res.describe()
    for name in ("agent", "server"):
        conf = c.path(f"/etc/outpost/{name}.toml")
        conf.write_text("surprise = 1\n" + conf.read_text())
    res = c.run("outpost-agent", "--config", "/etc/outpost/agent.toml", "policy", "status")
    assert res.returncode == 1 and "surprise" in res.stderr and "/etc/outpost/agent.toml" in res.stderr, res.describe()
    res = c.run("outpost-server", "--config", "/etc/outpost/server.toml", "serve")
    assert res.returncode == 1 and "surprise" in res.stderr and "/etc/outpost/server.toml" in res.stderr, res.describe()


def test_units_pass_systemd_analyze_verify(chroot):
    """Verified as installed (the ExecStart binaries must exist), against the chroot's
    systemd units; any message fails, since verify exits 0 on settings it ignores."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd (scripts/setup.sh does)", pytrace=False)
    c = chroot
    c.dpkg("--install", *(deb(p) for p in PACKAGES))
    res = run(["systemd-analyze", "verify", f"--root={c.root}", *(f"{u}.service" for u in SERVICES)])
    assert res.returncode == 0 and res.stdout.strip() == "" and res.stderr.strip() == "", res.describe()
    # The same check sees a mistake: a misspelt setting in a copy of the agent's unit.
    unit = c.path("/usr/lib/systemd/system/outpost-agent.service").read_text()
    c.path("/etc/systemd/system/outpost-broken.service").write_text(unit.replace("Type=notify", "Type=notifyy"))
    res = run(["systemd-analyze", "verify", f"--root={c.root}", "outpost-broken.service"])
    assert "notifyy" in res.stderr, res.describe()


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_units_are_notify_services_sandboxed_as_each_allows(tmp_path):
    for name in SERVICES:
        assert_ok(run(["dpkg-deb", "-x", deb(name), tmp_path / name]))
    agent = unit_settings((tmp_path / "outpost-agent/usr/lib/systemd/system/outpost-agent.service").read_text())
    server = unit_settings((tmp_path / "outpost-server/usr/lib/systemd/system/outpost-server.service").read_text())
    for unit in (agent, server):
        assert unit["Type"] == ["notify"] and unit["Restart"] == ["on-failure"], unit
        assert unit["WatchdogSec"] and unit["NoNewPrivileges"] == ["yes"] and unit["ProtectHome"] == ["yes"], unit
        assert unit["PrivateTmp"] == ["yes"], unit
    # The server: its own user, a read-only system but for its state, no devices, no
    # capabilities.
    assert server["User"] == ["outpost"] and server["ProtectSystem"] == ["strict"], server
    assert server["StateDirectory"] == ["outpost/server"] and server["PrivateDevices"] == ["yes"], server
    assert server["CapabilityBoundingSet"] == [""], server
    # The agent: root with every device (TPM, slots), writable bpffs and cgroups, the
    # ESP writable under ProtectSystem=full.
    assert "User" not in agent and agent["ProtectSystem"] == ["full"], agent
    for key in ("PrivateDevices", "DeviceAllow", "DevicePolicy", "ProtectClock", "ProtectKernelTunables",
                "ProtectControlGroups", "CapabilityBoundingSet", "SystemCallFilter"):
        assert key not in agent, f"{key} would take from the agent what it needs"
    assert "-/boot/efi" in agent["ReadWritePaths"][0].split(), agent

