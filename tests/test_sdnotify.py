"""The daemons speak systemd's notification protocol (Type=notify units): READY=1 once
they really serve (the server has bound its listener; the agent has loaded its
configuration and state), WATCHDOG=1 at half of WATCHDOG_USEC while running, STOPPING=1
on SIGTERM. The test plays the service manager: it binds the datagram socket that
$NOTIFY_SOCKET names (an abstract one, '@...', as systemd's own is a path) and reads
what arrives."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import Device, OutpostServer

WATCHDOG_USEC = 300_000  # pings every 150 ms


def manager_socket(name: str) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    abstract = f"outpost-test-{name}-{os.getpid()}-{time.monotonic_ns()}"
    sock.bind("\0" + abstract)
    sock.settimeout(30)
    return sock, "@" + abstract


def receive(sock: socket.socket, proc: subprocess.Popen, log) -> str:
    try:
        return sock.recv(256).decode()
    except socket.timeout:
        pytest.fail(f"no notice within 30 s (process exit code {proc.poll()}):\n{log.read_text()[-3000:]}",
                    pytrace=False)


def notices_of(argv: list[str], name: str, tmp_path, check_ready) -> list[str]:
    """Starts `argv` as systemd would, with a watchdog; checks the first notice is
    READY=1 (calling check_ready then), lets it ping, sends SIGTERM and returns every
    notice after READY=1 until it exited."""
    sock, address = manager_socket(name)
    env = dict(os.environ, NOTIFY_SOCKET=address, WATCHDOG_USEC=str(WATCHDOG_USEC))
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        first = receive(sock, proc, log)
        assert first == "READY=1", first
        check_ready()
        later = [receive(sock, proc, log) for _ in range(3)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    sock.setblocking(False)
    while True:
        try:
            later.append(sock.recv(256).decode())
        except BlockingIOError:
            break
    sock.close()
    return later


def test_the_server_is_ready_once_it_listens_and_says_when_it_stops(tmp_path, outpost_repo):
    server = OutpostServer(tmp_path, outpost_repo)

    def listening():
        # READY=1 came after the bind: the port takes connections now.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            pass

    later = notices_of([str(server.exe), "--config", str(server.config), "serve"], "server", tmp_path, listening)
    assert later[:3] == ["WATCHDOG=1"] * 3, later
    assert later[-1] == "STOPPING=1" and later.count("STOPPING=1") == 1, later
    assert "READY=1" not in later, later


def test_the_agent_is_ready_once_its_state_is_loaded_and_says_when_it_stops(tmp_path, outpost_repo):
    root = (outpost_repo.dir / "metadata" / "1.root.json").read_bytes()
    # No server answers there: the daemon logs its failed check-in and keeps running.
    dev = Device(tmp_path / "device", "http://127.0.0.1:9", root)
    dev.slot_path("A").parent.mkdir(parents=True, exist_ok=True)
    dev.slot_path("A").write_bytes(b"factory image")

    def state_loaded():
        # The trusted root was copied into the state directory before READY=1.
        assert (dev.state_dir / "metadata" / "root.json").read_bytes() == root

    later = notices_of([str(dev.exe), "--config", str(dev.config), "--log-level", "info", "run"], "agent", tmp_path,
                       state_loaded)
    assert later[:3] == ["WATCHDOG=1"] * 3, later
    assert later[-1] == "STOPPING=1" and later.count("STOPPING=1") == 1, later


def test_without_notify_socket_the_server_runs_as_before(tmp_path, outpost_repo, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    server = OutpostServer(tmp_path, outpost_repo)
    server.start()
    assert server.terminate() == 0
    assert "systemd" not in server.log_text(), server.log_text()[-2000:]


def test_a_malformed_notify_socket_is_logged_not_fatal(tmp_path, outpost_repo, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/socket")
    server = OutpostServer(tmp_path, outpost_repo)
    server.start()
    assert server.terminate() == 0
    assert "not notifying systemd" in server.log_text() and "relative/socket" in server.log_text(), server.log_text()[-2000:]

