"""An agent built without its `ebpf` feature (no nightly toolchain, no bpf-linker:
`cargo build -p outpost-agent --no-default-features`, which scripts/test.sh does into
target/no-ebpf) still runs, and refuses policy enforcement saying it is not built in,
before it creates or mounts anything: never a policy command that enforces nothing."""
import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
NO_EBPF = Path(os.environ.get("OUTPOST_NO_EBPF_AGENT", REPO_ROOT / "target" / "no-ebpf" / "debug" / "outpost-agent"))


def agent(*args, timeout=60):
    if not NO_EBPF.exists():
        pytest.fail(f"{NO_EBPF} is missing: build it with `cargo build -p outpost-agent --no-default-features "
                    f"--target-dir target/no-ebpf` (scripts/test.sh does)", pytrace=False)
    return subprocess.run([str(NO_EBPF), *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_policy_enforcement_is_refused_as_not_built_in(tmp_path):
    bundle = tmp_path / "bundle.json"
    bundle.write_text("{}")
    pins = tmp_path / "pins"
    res = agent("policy", "enforce", str(bundle), "--cgroup-root", str(tmp_path), "--pin-dir", str(pins))
    assert res.returncode != 0, res
    assert "policy enforcement is not built into this agent" in res.stderr, res.stderr
    assert "ebpf" in res.stderr, res.stderr
    assert not pins.exists(), "nothing is created before the refusal"


def test_the_rest_of_the_agent_is_there(tmp_path):
    # The TUF client works without eBPF: a missing trusted root is its own error, not
    # a missing feature.
    res = agent("tuf-client", "--metadata-dir", str(tmp_path / "md"), "init", str(tmp_path / "nope.json"))
    assert res.returncode != 0
    assert "not built into" not in res.stderr and "nope.json" in res.stderr, res.stderr
