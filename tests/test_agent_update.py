"""`outpost-agent --config agent.toml update [--json]`: the device's update check.

Against the simulator (python-tuf's Metadata API, served at sim.base_url so the
agent's server_url is the simulator's root) and once against the real server:
the newest firmware for the configured hardware class is chosen (numeric version
order), downloaded verified into state_dir/downloads/<quoted target path>, and
reported; targets signed for another class, or outside the signing role's
delegated paths, are never chosen; a failed download leaves nothing behind; a
malformed config is refused naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
from tuf.api.metadata import Delegations, Metadata, SuccinctRoles, Targets
from tuf.ngclient import Updater

from conftest import (
    FW_BYTES,
    FW_PATH,
    HASH_WORDS,
    LENGTH_WORDS,
    Agent,
    TufClient,
    assert_fails,
    assert_ok,
    binary,
    run,
    toml_str,
)
from reposim import RepoSim, expires_in, firmware_custom, new_signer, quote_all

REPORT_FIELDS = {"hardware_class", "root_version", "timestamp_version", "snapshot_version",
                 "target", "signed_by_role", "version", "length", "sha256",
                 "expected_measurement", "path", "already_present"}


def fw_data(cls: str, version: str, size: int = 3000) -> bytes:
    seed = f"firmware {cls} {version}\n".encode()
    return (seed * (size // len(seed) + 1))[:size]


def add_fw(sim: RepoSim, role: str, version: str, cls: str = "rpi4", *,
           path_class: str | None = None, signed_class: str | None = None,
           measurement: str | None = None, data: bytes | None = None,
           name: str = "fw.img") -> tuple[str, bytes]:
    """List firmware/<path_class>/<version>/<name> in `role` with Outpost custom
    metadata saying `signed_class` (default: the class in the path)."""
    path_class = path_class or cls
    signed_class = signed_class or cls
    data = fw_data(signed_class, version) if data is None else data
    path = f"firmware/{path_class}/{version}/{name}"
    sim.add_target(role, path, data,
                   custom=firmware_custom(version, signed_class, measurement, data))
    return path, data


def device(sim: RepoSim, tmp_path: Path, name: str = "device", **kw) -> Agent:
    return Agent(tmp_path / name, sim.base_url, sim.root_history[1], **kw)


# ------------------------------------------------------------ choosing firmware
def test_update_downloads_newest_version_and_reports_it(sim, tmp_path):
    sim.add_delegation("targets", "firmware", paths=["firmware/rpi4/*/*"])
    fws = {v: add_fw(sim, "firmware", v) for v in ("1.0.0", "1.9.0", "1.2.3")}
    measurement = "ab" * 32  # what the TPM will record: not the file's own sha256
    fws["1.10.0"] = add_fw(sim, "firmware", "1.10.0", measurement=measurement)
    # A file under the prefix without Outpost custom metadata is not firmware.
    sim.add_target("firmware", "firmware/rpi4/notes/README.txt", b"release notes")
    sim.publish("targets", "firmware")
    agent = device(sim, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    res = assert_ok(agent.update(cwd=elsewhere))
    report = Agent.report(res)
    path, data = fws["1.10.0"]
    assert REPORT_FIELDS <= set(report), f"missing fields {REPORT_FIELDS - set(report)}\n" \
        + res.describe()
    expected = {
        "hardware_class": "rpi4",
        "root_version": 1,
        "timestamp_version": sim.version("timestamp"),
        "snapshot_version": sim.version("snapshot"),
        "target": path,
        "signed_by_role": "firmware",
        "version": "1.10.0",
        "length": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "expected_measurement": measurement,
        "already_present": False,
    }
    got = {k: report.get(k) for k in expected}
    assert got == expected, res.describe()
    stored = agent.downloads / quote_all(path)
    assert Path(report["path"]).resolve() == stored.resolve(), res.describe()
    assert agent.download_files() == {quote_all(path): data}, res.describe()
    assert sim.target_requests() == [sim.target_path(path)], res.describe()
    # Relative paths in the config are relative to the config file, not the cwd.
    assert (agent.state_dir / "metadata" / "root.json").is_file()
    assert list(elsewhere.iterdir()) == []

    # Second run: nothing new, the verified copy is reused without a request.
    sim.clear_requests()
    res = assert_ok(agent.update(cwd=elsewhere))
    again = Agent.report(res)
    assert again.get("already_present") is True, res.describe()
    assert {k: again.get(k) for k in expected if k != "already_present"} == \
        {k: v for k, v in expected.items() if k != "already_present"}, res.describe()
    assert sim.target_requests() == [], res.describe()
    assert "metadata/timestamp.json" in sim.metadata_requests(), "second run did not refresh"
    assert agent.download_files() == {quote_all(path): data}


def test_update_human_output_names_version_and_file(sim, tmp_path):
    sim.add_delegation("targets", "firmware", paths=["firmware/rpi4/*/*"])
    path, data = add_fw(sim, "firmware", "2.4.1")
    sim.publish("targets", "firmware")
    agent = device(sim, tmp_path)
    res = assert_ok(agent.update(as_json=False))
    assert "2.4.1" in res.stdout, res.describe()
    assert str(agent.downloads / quote_all(path)) in res.stdout, res.describe()
    assert agent.stored(path) == data


def test_update_follows_new_release_and_nested_delegations_lazily(sim, tmp_path):
    """targets -> firmware (firmware/*/*/*) -> rpi4 (firmware/rpi4/*/*); the x86 role
    under firmware cannot match firmware/rpi4/ and is never fetched."""
    sim.add_delegation("targets", "firmware", paths=["firmware/*/*/*"])
    sim.add_delegation("firmware", "x86", paths=["firmware/x86/*/*"])
    sim.add_delegation("firmware", "rpi4", paths=["firmware/rpi4/*/*"])
    add_fw(sim, "x86", "7.0.0", cls="x86")
    add_fw(sim, "rpi4", "1.0.0")
    sim.publish("targets", "firmware", "x86", "rpi4")
    agent = device(sim, tmp_path)
    report = Agent.report(assert_ok(agent.update()))
    assert (report.get("version"), report.get("signed_by_role")) == ("1.0.0", "rpi4")
    assert not any("x86" in r for r in sim.metadata_requests()), sim.metadata_requests()

    path, data = add_fw(sim, "rpi4", "1.1.0")
    sim.publish("rpi4")
    sim.clear_requests()
    res = assert_ok(agent.update())
    report = Agent.report(res)
    assert (report.get("version"), report.get("already_present")) == ("1.1.0", False), \
        res.describe()
    assert agent.stored(path) == data
    assert sim.target_requests() == [sim.target_path(path)], res.describe()


def test_update_replaces_corrupted_local_copy(sim, tmp_path):
    sim.add_delegation("targets", "firmware", paths=["firmware/rpi4/*/*"])
    path, data = add_fw(sim, "firmware", "1.0.0")
    sim.publish("targets", "firmware")
    agent = device(sim, tmp_path)
    assert_ok(agent.update())
    (agent.downloads / quote_all(path)).write_bytes(b"\0" * len(data))  # same length, bad bytes
    sim.clear_requests()
    res = assert_ok(agent.update())
    assert Agent.report(res).get("already_present") is False, res.describe()
    assert agent.download_files() == {quote_all(path): data}, res.describe()
    assert sim.target_requests() == [sim.target_path(path)]


# ------------------------------------------------------- refusing wrong firmware
@pytest.mark.parametrize("with_good_release", [False, True], ids=["alone", "beside-good"])
def test_update_refuses_target_signed_for_other_hardware_class(sim, tmp_path, with_good_release):
    """Attack: filed under firmware/rpi4/ but its signed metadata says x86."""
    sim.add_delegation("targets", "firmware", paths=["firmware/rpi4/*/*"])
    if with_good_release:
        add_fw(sim, "firmware", "1.0.0")
    add_fw(sim, "firmware", "2.0.0", signed_class="x86")
    sim.publish("targets", "firmware")
    agent = device(sim, tmp_path)
    res = assert_fails(agent.update(), "hardware class")
    assert agent.download_files() == {}, res.describe()
    assert sim.target_requests() == [], "the mismatched target was downloaded\n" + res.describe()


@pytest.mark.parametrize("repo_content", ["other-class", "empty"])
def test_update_without_firmware_for_this_class_fails(sim, tmp_path, repo_content):
    if repo_content == "other-class":
        sim.add_delegation("targets", "firmware-x86", paths=["firmware/x86/*/*"])
        add_fw(sim, "firmware-x86", "3.0.0", cls="x86")
        add_fw(sim, "targets", "3.0.1", cls="x86")
        sim.publish("targets", "firmware-x86")
    agent = device(sim, tmp_path)
    res = assert_fails(agent.update(), "no firmware for hardware class rpi4")
    assert agent.download_files() == {}, res.describe()
    assert sim.target_requests() == [], res.describe()


@pytest.mark.parametrize("rogue_paths", [["firmware/x86/*/*"], ["firmware/rpi4/1.*/*"],
                                         ["firmware/*"]],
                         ids=["other-class-role", "narrower-pattern", "one-segment-star"])
@pytest.mark.parametrize("with_good_release", [True, False], ids=["beside-good", "alone"])
def test_update_ignores_target_outside_signing_roles_delegation(sim, tmp_path, rogue_paths,
                                                                with_good_release):
    """A role signs firmware/rpi4/9.9.9/fw.img although its delegation does not
    cover that path: the target does not exist as far as TUF is concerned."""
    sim.add_delegation("targets", "rogue", paths=rogue_paths)
    rogue_path, _ = add_fw(sim, "rogue", "9.9.9")
    roles = ["targets", "rogue"]
    if with_good_release:
        sim.add_delegation("targets", "firmware", paths=["firmware/rpi4/*/*"])
        good_path, good = add_fw(sim, "firmware", "1.0.0")
        roles.append("firmware")
    sim.publish(*roles)
    agent = device(sim, tmp_path)
    res = agent.update()
    if with_good_release:
        report = Agent.report(assert_ok(res))
        assert (report.get("target"), report.get("signed_by_role")) == (good_path, "firmware"), \
            res.describe()
        assert agent.download_files() == {quote_all(good_path): good}
    else:
        assert_fails(res, "no firmware for hardware class rpi4")
        assert agent.download_files() == {}, res.describe()
    assert sim.target_path(rogue_path, "rogue") not in sim.target_requests(), res.describe()


def _reference_target(sim: RepoSim, tmp_path: Path, path: str):
    """What python-tuf's ngclient (the specification's reference client) resolves."""
    ref_md = tmp_path / "ref-md"
    ref_md.mkdir(exist_ok=True)
    (ref_md / "root.json").write_bytes(sim.root_history[1])
    ref = Updater(str(ref_md), sim.metadata_url, str(tmp_path), sim.targets_url, bootstrap=None)
    ref.refresh()
    return ref.get_targetinfo(path)


@pytest.mark.parametrize("with_good_release", [True, False], ids=["beside-good", "alone"])
def test_update_refuses_target_whose_chain_escapes_a_parents_paths(sim, tmp_path,
                                                                   with_good_release):
    """`targets` gives `fw-beta` only firmware/rpi4/*-beta/*; fw-beta delegates `X`
    firmware/rpi4/*/* (wider than its own grant) and X signs 9.9.9. The search for
    that path never enters fw-beta (its pattern does not match), so 9.9.9 is not a
    target of this repository: every hop of a chain must match, not only the last."""
    sim.add_delegation("targets", "fw-beta", paths=["firmware/rpi4/*-beta/*"])
    sim.add_delegation("fw-beta", "X", paths=["firmware/rpi4/*/*"])
    rogue_path, _ = add_fw(sim, "X", "9.9.9", name="image.bin")
    beta_path, beta = add_fw(sim, "X", "2.0.0-beta", name="image.bin")
    roles = ["targets", "fw-beta", "X"]
    if with_good_release:
        sim.add_delegation("targets", "firmware", paths=["firmware/rpi4/*/*"])
        good_path, good = add_fw(sim, "firmware", "1.0.0")
        roles.append("firmware")
    sim.publish(*roles)
    assert _reference_target(sim, tmp_path, rogue_path) is None, "simulator/reference disagree"
    assert _reference_target(sim, tmp_path, beta_path) is not None

    agent = device(sim, tmp_path)
    res = assert_ok(agent.update())
    report = Agent.report(res)
    # 2.0.0-beta is reached through fw-beta -> X for its own path, and is newer than
    # 1.0.0; 9.9.9, newer still, is not reachable at all.
    assert (report.get("target"), report.get("signed_by_role")) == (beta_path, "X"), \
        "update chose a target that TUF's delegation search does not reach\n" + res.describe()
    assert agent.download_files() == {quote_all(beta_path): beta}
    assert sim.target_path(rogue_path, "X") not in sim.target_requests(), res.describe()


def test_update_takes_each_paths_target_from_the_role_the_search_reaches_first(sim, tmp_path):
    """Two roles list the same path with different bytes; the search for that path
    reaches `first` before `second`, so first's file is the target (not the one a
    walk happened to read first)."""
    sim.add_delegation("targets", "first", paths=["firmware/rpi4/1.*/*"])
    sim.add_delegation("targets", "second", paths=["firmware/rpi4/*/*"])
    # `second` is walked too (its pattern matches): it lists 1.5.0 with other bytes.
    path, genuine = add_fw(sim, "first", "1.5.0")
    add_fw(sim, "second", "1.5.0", data=b"other bytes for the same path " * 50)
    sim.publish("targets", "first", "second")
    assert _reference_target(sim, tmp_path, path).length == len(genuine)

    agent = device(sim, tmp_path)
    report = Agent.report(assert_ok(agent.update()))
    assert (report.get("target"), report.get("signed_by_role")) == (path, "first")
    assert agent.stored(path) == genuine


def test_update_honours_terminating_delegation(sim, tmp_path):
    """`stable` is a terminating delegation for firmware/rpi4/*/*: for those paths
    the search ends there, so 2.0.0 listed by the later role `beta` is not a target
    of this repository (python-tuf's client cannot find it either)."""
    sim.add_delegation("targets", "stable", paths=["firmware/rpi4/*/*"], terminating=True)
    sim.add_delegation("targets", "beta", paths=["firmware/rpi4/*/*"])
    stable_path, stable = add_fw(sim, "stable", "1.0.0")
    beta_path, _ = add_fw(sim, "beta", "2.0.0")
    sim.publish("targets", "stable", "beta")

    ref_md = tmp_path / "ref-md"
    ref_md.mkdir()
    (ref_md / "root.json").write_bytes(sim.root_history[1])
    ref = Updater(str(ref_md), sim.metadata_url, str(tmp_path), sim.targets_url, bootstrap=None)
    ref.refresh()
    assert ref.get_targetinfo(beta_path) is None, "simulator/reference disagree"
    assert ref.get_targetinfo(stable_path) is not None

    agent = device(sim, tmp_path)
    res = assert_ok(agent.update())
    report = Agent.report(res)
    assert (report.get("target"), report.get("signed_by_role")) == (stable_path, "stable"), \
        "update chose a target that TUF's delegation search does not reach\n" + res.describe()
    assert agent.download_files() == {quote_all(stable_path): stable}


def test_update_finds_firmware_in_succinct_hash_bin_delegations(sim, tmp_path):
    """TAP 15 succinct roles (hash bins, no path patterns): every bin may hold
    firmware/rpi4/ targets, so the search must look into them."""
    succinct = SuccinctRoles(keyids=[], threshold=1, bit_length=2, name_prefix="bin")
    sim.roles["targets"].signed.delegations = Delegations(keys={}, succinct_roles=succinct)
    signer = new_signer()
    sim.roles["targets"].signed.add_key(signer.public_key)
    for name in succinct.get_roles():
        sim.roles[name] = Metadata(Targets(expires=expires_in(days=30)))
        sim.signers[name] = [signer]
    fws = {}
    for version in ("1.0.0", "1.2.0", "1.10.0"):
        path = f"firmware/rpi4/{version}/fw.img"
        fws[version] = add_fw(sim, succinct.get_role_for_target(path), version)
    sim.publish("targets", *succinct.get_roles())
    newest_path, newest = fws["1.10.0"]

    ref_md = tmp_path / "ref-md"
    ref_md.mkdir()
    (ref_md / "root.json").write_bytes(sim.root_history[1])
    ref = Updater(str(ref_md), sim.metadata_url, str(tmp_path), sim.targets_url, bootstrap=None)
    ref.refresh()
    assert all(ref.get_targetinfo(p) is not None for p, _ in fws.values())

    agent = device(sim, tmp_path)
    res = assert_ok(agent.update())
    report = Agent.report(res)
    assert (report.get("target"), report.get("signed_by_role")) == \
        (newest_path, succinct.get_role_for_target(newest_path)), res.describe()
    assert agent.stored(newest_path) == newest


# ------------------------------------------------------------- failed downloads
@pytest.mark.parametrize("attack", ["other-bytes", "longer", "shorter", "stall"])
def test_failed_target_download_leaves_nothing_in_downloads(sim, tmp_path, attack):
    sim.add_delegation("targets", "firmware", paths=["firmware/rpi4/*/*"])
    path, data = add_fw(sim, "firmware", "1.0.0")
    sim.publish("targets", "firmware")
    served = sim.target_path(path)
    words: tuple[str, ...]
    if attack == "other-bytes":
        sim.misbehave(served, "bytes", data=bytes(b ^ 0xFF for b in data))
        words = HASH_WORDS
    elif attack == "longer":
        sim.misbehave(served, "bytes", data=data + b"MALWARE")
        words = LENGTH_WORDS
    elif attack == "shorter":
        sim.misbehave(served, "bytes", data=data[:-100])
        words = LENGTH_WORDS
    else:
        sim.misbehave(served, "stall", seconds=20)
        words = ("timed out", "timeout", "stall", "slow")
    agent = device(sim, tmp_path, timeout="1s")
    res = assert_fails(agent.update(timeout=20), *words)
    assert agent.download_files() == {}, "a failed download left files\n" + res.describe()
    if attack == "stall":
        assert res.elapsed < 10, res.describe()


def test_failed_update_keeps_previously_verified_firmware(sim, tmp_path):
    sim.add_delegation("targets", "firmware", paths=["firmware/rpi4/*/*"])
    old_path, old = add_fw(sim, "firmware", "1.0.0")
    sim.publish("targets", "firmware")
    agent = device(sim, tmp_path)
    assert_ok(agent.update())
    new_path, new = add_fw(sim, "firmware", "1.1.0")
    sim.publish("firmware")
    sim.misbehave(sim.target_path(new_path), "bytes", data=new[:-1] + b"!")
    res = assert_fails(agent.update(), *HASH_WORDS)
    assert agent.download_files() == {quote_all(old_path): old}, res.describe()


def test_partial_file_left_by_a_killed_run_is_cleaned_up(sim, tmp_path):
    """Power loss mid-download leaves a temporary file; the next update must not
    keep it (each interrupted run would otherwise leave one more on the device)."""
    sim.add_delegation("targets", "firmware", paths=["firmware/rpi4/*/*"])
    path, data = add_fw(sim, "firmware", "1.0.0", data=fw_data("rpi4", "1.0.0", 200_000))
    sim.publish("targets", "firmware")
    served = sim.target_path(path)
    sim.misbehave(served, "stall", seconds=30)
    agent = device(sim, tmp_path, timeout="30s")
    proc = subprocess.Popen([str(agent.exe), "--config", str(agent.config), "update"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not agent.download_files() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(5)
    leftover = agent.download_files()
    assert leftover, "precondition: the interrupted download left no temporary file"
    with sim.lock:
        del sim.misbehaviours[served]
    res = assert_ok(agent.update())
    assert agent.download_files() == {quote_all(path): data}, \
        f"temporary files of the killed run are still there: {sorted(leftover)}\n" + res.describe()


# ------------------------------------------------------------------- config
GOOD = {"server_url": None, "hardware_class": "rpi4", "state_dir": "state",
        "trusted_root": "root.json"}


def _config_text(sim: RepoSim, changes: dict, drop: str | None = None, extra: str = "",
                 http: str = 'timeout = "5s"\n') -> str:
    values = dict(GOOD, server_url=sim.base_url)
    values.update(changes)
    lines = [f"{k} = {toml_str(v)}" for k, v in values.items() if k != drop]
    return "\n".join(lines) + "\n" + extra + "\n[http]\n" + http


BAD_CONFIGS = {
    "unknown-key": ({}, None, 'colour = "blue"\n', 'timeout = "5s"\n', "colour"),
    "unknown-http-key": ({}, None, "", 'timeout = "5s"\nretries = 3\n', "retries"),
    "hardware-class-spaces": ({"hardware_class": "RPi 4"}, None, "", 'timeout = "5s"\n',
                              "hardware_class"),
    "hardware-class-empty": ({"hardware_class": ""}, None, "", 'timeout = "5s"\n',
                             "hardware_class"),
    "server-url-no-scheme": ({"server_url": "127.0.0.1:9"}, None, "", 'timeout = "5s"\n',
                             "server_url"),
    "server-url-ftp": ({"server_url": "ftp://127.0.0.1:9/"}, None, "", 'timeout = "5s"\n',
                       "server_url"),
    "missing-trusted-root": ({}, "trusted_root", "", 'timeout = "5s"\n', "trusted_root"),
    "bad-timeout": ({}, None, "", 'timeout = "soon"\n', "timeout"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_malformed_agent_config_is_refused_naming_file_and_field(sim, tmp_path, case):
    changes, drop, extra, http, field = BAD_CONFIGS[case]
    workdir = tmp_path / "device"
    workdir.mkdir()
    (workdir / "root.json").write_bytes(sim.root_history[1])
    config = workdir / "agent.toml"
    config.write_text(_config_text(sim, changes, drop, extra, http))
    res = run([binary("outpost-agent"), "--config", config, "update", "--json"])
    assert_fails(res, field)
    assert str(config) in res.stderr, "error does not name the config file\n" + res.describe()
    assert not (workdir / "state").exists(), res.describe()
    assert sim.requests == [], "the agent used a config it should have refused"


def test_missing_trusted_root_file_is_named(sim, tmp_path):
    agent = device(sim, tmp_path)
    (agent.workdir / "provisioned-root.json").unlink()
    res = assert_fails(agent.update())
    assert "provisioned-root.json" in res.stderr, res.describe()
    assert agent.download_files() == {}
    assert sim.requests == [], "the agent fetched metadata without a root of trust"


def test_agent_config_example_from_docs_parses_with_local_values(sim, tmp_path):
    """docs/examples/agent.toml, pointed at the simulator, is a working config."""
    sim.add_delegation("targets", "firmware", paths=["firmware/rpi4/*/*"])
    path, data = add_fw(sim, "firmware", "1.0.0")
    sim.publish("targets", "firmware")
    example = (Path(__file__).resolve().parent.parent / "docs" / "examples" / "agent.toml")
    text = example.read_text()
    workdir = tmp_path / "device"
    workdir.mkdir()
    (workdir / "root.json").write_bytes(sim.root_history[1])
    replaced = []
    out = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if key in ("server_url", "state_dir", "trusted_root"):
            value = {"server_url": sim.base_url, "state_dir": str(workdir / "state"),
                     "trusted_root": "root.json"}[key]
            line = f"{key} = {toml_str(value)}"
            replaced.append(key)
        out.append(line)
    assert sorted(replaced) == ["server_url", "state_dir", "trusted_root"], text
    config = workdir / "agent.toml"
    config.write_text("\n".join(out) + "\n")
    res = assert_ok(run([binary("outpost-agent"), "--config", config, "update", "--json"]))
    assert json.loads(res.stdout)["target"] == path
    assert (workdir / "state" / "downloads" / quote_all(path)).read_bytes() == data


# ---------------------------------------------------------- against the server
def test_update_against_outpost_server(tmp_path, published):
    repo, server, token = published
    agent = Agent(tmp_path / "device", server.url, repo.root1)
    res = assert_ok(agent.update())
    report = Agent.report(res)
    assert {k: report.get(k) for k in ("target", "signed_by_role", "version", "hardware_class",
                                       "expected_measurement", "already_present")} == {
        "target": FW_PATH, "signed_by_role": "firmware", "version": "1.0.0",
        "hardware_class": "rpi4", "expected_measurement": hashlib.sha256(FW_BYTES).hexdigest(),
        "already_present": False}, res.describe()
    assert agent.stored(FW_PATH) == FW_BYTES

    newest = fw_data("rpi4", "1.10.0")
    repo.publish(newest, "1.10.0", server=server, token=token)
    repo.publish(fw_data("rpi4", "1.9.0"), "1.9.0", server=server, token=token)
    res = assert_ok(agent.update())
    report = Agent.report(res)
    assert (report.get("version"), report.get("target")) == \
        ("1.10.0", "firmware/rpi4/1.10.0/fw.img"), res.describe()
    assert agent.stored("firmware/rpi4/1.10.0/fw.img") == newest
    # python-tuf-compatible clients agree: the same file is a verified target.
    client = TufClient(tmp_path / "tuf", metadata_url=f"{server.url}/metadata/",
                       targets_url=f"{server.url}/targets/")
    assert_ok(client.init(repo.root1))
    assert_ok(client.download("firmware/rpi4/1.10.0/fw.img"))
    assert client.stored_target("firmware/rpi4/1.10.0/fw.img") == newest


def test_update_against_unreachable_server_fails_cleanly(sim, tmp_path):
    from conftest import free_port
    agent = Agent(tmp_path / "device", f"http://127.0.0.1:{free_port()}",
                  sim.root_history[1], timeout="2s")
    start = time.monotonic()
    res = assert_fails(agent.update(timeout=30))
    assert time.monotonic() - start < 15, res.describe()
    assert agent.download_files() == {}
