"""The `outpost` signer CLI: key files, `repo init` argument checks, and
`release publish` refusals that must leave the local repository untouched.

(That a repository made with private snapshot/timestamp keys is a complete
static TUF repository readable by python-tuf is tested in test_interop.py.)
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
from pathlib import Path

import pytest
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import Signature, SSlibKey

from conftest import OutpostRepo, assert_fails, assert_ok, binary, run, tree_files

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def outpost(*args, **kw):
    return run([binary("outpost"), *args], **kw)


def json_out(res) -> dict:
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        pytest.fail("--json output is not JSON\n" + res.describe(), pytrace=False)
    assert isinstance(doc, dict), res.describe()
    return doc


def public_key_object(path: Path) -> dict:
    """The TUF public key object of a key file (without the private part)."""
    doc = json.loads(path.read_bytes())
    return {"keytype": doc["keytype"], "scheme": doc["scheme"],
            "keyval": {"public": doc["keyval"]["public"]}}


def expected_keyid(path: Path) -> str:
    """TUF key id: sha256 of the canonical JSON of the public key object."""
    obj = public_key_object(path)
    by_hand = hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"))
                             .encode()).hexdigest()
    assert by_hand == hashlib.sha256(encode_canonical(obj).encode()).hexdigest()
    return by_hand


# ---------------------------------------------------------------------- keys
def test_keys_generate_writes_private_0600_and_public_file(tmp_path):
    key = tmp_path / "release.key"
    res = assert_ok(outpost("keys", "generate", "--out", key))
    pub = Path(f"{key}.pub")
    assert key.is_file() and pub.is_file(), res.describe()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600, oct(key.stat().st_mode)
    private = json.loads(key.read_bytes())
    public = json.loads(pub.read_bytes())
    assert private["keytype"] == private["scheme"] == "ed25519"
    assert re.fullmatch(r"[0-9a-f]{64}", private["keyval"].get("private", "")), private.keys()
    assert "private" not in public["keyval"], "the .pub file holds the private key"
    assert public["keyval"]["public"] == private["keyval"]["public"]
    assert expected_keyid(key) in res.stdout, "generate does not print the TUF key id\n" \
        + res.describe()
    assert private["keyval"]["private"] not in res.stdout + res.stderr


def test_keys_generate_refuses_to_overwrite_existing_key(tmp_path):
    key = tmp_path / "release.key"
    assert_ok(outpost("keys", "generate", "--out", key))
    before = (key.read_bytes(), Path(f"{key}.pub").read_bytes())
    res = assert_fails(outpost("keys", "generate", "--out", key), "exist", "overwrite")
    assert (key.read_bytes(), Path(f"{key}.pub").read_bytes()) == before, res.describe()


def test_keys_generate_refuses_when_only_the_pub_file_exists(tmp_path):
    """A stray FILE.pub (e.g. someone else's public key) must not end in a new
    private key beside a .pub that does not belong to it."""
    key = tmp_path / "release.key"
    other = tmp_path / "other.key"
    assert_ok(outpost("keys", "generate", "--out", other))
    pub = Path(f"{key}.pub")
    pub.write_bytes(Path(f"{other}.pub").read_bytes())
    before = pub.read_bytes()
    res = assert_fails(outpost("keys", "generate", "--out", key), "exist", "overwrite")
    assert pub.read_bytes() == before, res.describe()
    assert not key.exists(), "a failed `keys generate` left a private key without its " \
        "public key file\n" + res.describe()


@pytest.mark.parametrize("as_json", [False, True], ids=["human", "json"])
def test_keys_show_never_prints_the_private_key(tmp_path, as_json):
    key = tmp_path / "k"
    assert_ok(outpost("keys", "generate", "--out", key))
    private_hex = json.loads(key.read_bytes())["keyval"]["private"]
    keyid = expected_keyid(key)
    for f in (key, Path(f"{key}.pub")):
        args = ["--json"] if as_json else []
        res = assert_ok(outpost(*args, "keys", "show", f))
        out = res.stdout + res.stderr
        assert private_hex not in out and private_hex.upper() not in out, res.describe()
        assert private_hex[:16] not in out, "part of the private key is printed\n" + res.describe()
        assert keyid in res.stdout, res.describe()
        if as_json:
            doc = json_out(res)
            assert doc.get("keyid") == keyid, res.describe()
            assert doc.get("public") == public_key_object(key)["keyval"]["public"]
            assert doc.get("has_private") is (f == key), res.describe()
            assert private_hex not in json.dumps(doc)


def test_key_ids_in_json_output_are_tuf_key_ids(tmp_path):
    key = tmp_path / "k"
    gen = json_out(assert_ok(outpost("--json", "keys", "generate", "--out", key)))
    keyid = gen.get("keyid", "")
    assert HEX64.match(keyid), gen
    assert keyid == expected_keyid(key)
    show = json_out(assert_ok(outpost("--json", "keys", "show", f"{key}.pub")))
    assert show.get("keyid") == keyid
    # python-tuf/securesystemslib accept the key object under that id and verify
    # signatures made with it: see the root written by `repo init` below.
    SSlibKey.from_dict(keyid, public_key_object(key))


def test_root_written_by_repo_init_lists_keys_under_their_tuf_ids(tmp_path):
    repo = OutpostRepo(tmp_path / "signer")
    repo.init()
    root = json.loads((repo.dir / "metadata" / "1.root.json").read_bytes())
    keys = root["signed"]["keys"]
    for name in ("root1", "root2", "root3", "targets", "snapshot", "timestamp"):
        keyid = expected_keyid(repo.key(name))
        assert keyid in keys, f"{name} key {keyid} not in root keys {list(keys)}"
        assert keys[keyid]["keyval"]["public"] == public_key_object(repo.key(name))["keyval"]["public"]
        assert hashlib.sha256(encode_canonical(keys[keyid]).encode()).hexdigest() == keyid
    signed = encode_canonical(root["signed"]).encode()
    valid = 0
    for sig in root["signatures"]:
        key = SSlibKey.from_dict(sig["keyid"], dict(keys[sig["keyid"]]))
        key.verify_signature(Signature(sig["keyid"], sig["sig"]), signed)
        valid += 1
    assert valid >= 2


# ------------------------------------------------------------------ repo init
@pytest.mark.parametrize("threshold", ["4", "0"])
def test_repo_init_refuses_threshold_the_root_keys_cannot_meet(tmp_path, threshold):
    repo = OutpostRepo(tmp_path / "signer")
    res = assert_fails(repo.cli(
        "repo", "init", "--repo", repo.dir,
        "--root-key", repo.key("root1"), "--root-key", repo.key("root2"),
        "--root-key", repo.key("root3"), "--threshold", threshold,
        "--targets-key", repo.key("targets"), "--snapshot-key", repo.key("snapshot"),
        "--timestamp-key", repo.key("timestamp"), check=False), "threshold")
    assert threshold in res.stderr and "3" in res.stderr, \
        "message does not say which threshold and how many keys\n" + res.describe()
    assert not (repo.dir / "metadata" / "root.json").exists(), res.describe()


def test_repo_init_refuses_an_initialized_repository(outpost_repo):
    before = tree_files(outpost_repo.dir)
    res = outpost_repo.cli(
        "repo", "init", "--repo", outpost_repo.dir, "--root-key", outpost_repo.key("root1"),
        "--threshold", "1", "--targets-key", outpost_repo.key("targets"),
        "--snapshot-key", outpost_repo.key("snapshot"),
        "--timestamp-key", outpost_repo.key("timestamp"), check=False)
    assert_fails(res, "already", "exists", "initialized")
    assert tree_files(outpost_repo.dir) == before


# ------------------------------------------------------------- release publish
def test_release_publish_with_a_key_that_is_not_the_roles_fails_and_changes_nothing(outpost_repo):
    before = tree_files(outpost_repo.dir)
    res = outpost_repo.publish(b"image", "1.0.0", key="targets", check=False)
    assert_fails(res, "firmware")
    err = res.stderr.lower()
    assert "threshold" in err or re.search(r"\b1 signature", err), \
        "message does not state the role's threshold\n" + res.describe()
    assert tree_files(outpost_repo.dir) == before, "a refused publish changed the repository"


def test_release_publish_below_threshold_names_role_and_threshold(outpost_repo):
    for k in ("x86-a", "x86-b"):
        outpost_repo.key(k)
    outpost_repo.cli("repo", "delegate", "--repo", outpost_repo.dir, "--role", "firmware-x86",
                     "--delegate-key", outpost_repo.key("x86-a"),
                     "--delegate-key", outpost_repo.key("x86-b"), "--threshold", "2",
                     "--paths", "firmware/x86/*/*", "--sign-key", outpost_repo.key("targets"))
    before = tree_files(outpost_repo.dir)
    res = outpost_repo.publish(b"x86 image", "1.0.0", hardware_class="x86", key="x86-a",
                               check=False)
    assert_fails(res, "firmware-x86")
    err = res.stderr.lower()
    assert re.search(r"threshold\D{0,12}2\b|\b2 signature|needs 2\b", err), \
        "message does not state the threshold (2)\n" + res.describe()
    assert tree_files(outpost_repo.dir) == before, "a refused publish changed the repository"
    # With both keys it works, and lands in the delegated role.
    res = outpost_repo.publish(b"x86 image", "1.0.0", hardware_class="x86", key="x86-a",
                               extra=("--key", outpost_repo.key("x86-b"), "--json"))
    doc = json_out(res)
    assert (doc.get("role"), doc.get("target")) == ("firmware-x86", "firmware/x86/1.0.0/fw.img")


def test_release_publish_same_version_other_content_is_refused(outpost_repo):
    doc = json_out(outpost_repo.publish(b"first build", "1.0.0", extra=("--json",)))
    assert doc.get("target") == "firmware/rpi4/1.0.0/fw.img"
    assert doc.get("sha256") == hashlib.sha256(b"first build").hexdigest()
    assert doc.get("role") == "firmware"
    before = tree_files(outpost_repo.dir)
    res = outpost_repo.publish(b"second, different build", "1.0.0", check=False)
    assert_fails(res, "immutable")
    assert tree_files(outpost_repo.dir) == before, "a refused publish changed the repository"


# ------------------------------------------------- release publish: measured boot
EFI_IMAGE = Path(__file__).resolve().parent.parent / "protocol/src/attest/testdata/small-pe32plus.efi"


def test_release_publish_signs_golden_boot_values_computed_from_the_boot_files(outpost_repo, tmp_path):
    boot = tmp_path / "boot"
    boot.mkdir()
    files = {"vmlinuz": b"kernel bytes", "initrd.img": b"initrd bytes", "grub.cfg": b"menuentry {}"}
    for name, data in files.items():
        (boot / name).write_bytes(data)
    cmdline = "/vmlinuz root=/dev/mapper/root ro verity.roothash=" + "ab" * 32
    flags = ("--boot-efi", EFI_IMAGE, "--boot-kernel", boot / "vmlinuz", "--boot-initrd", boot / "initrd.img",
             "--boot-file", boot / "grub.cfg")
    # A command line GRUB would not measure as written is refused, and nothing is signed.
    before = tree_files(outpost_repo.dir)
    res = outpost_repo.publish(b"image", "1.0.0", check=False, extra=(*flags, "--boot-cmdline", '/vmlinuz a="b c"'))
    assert_fails(res, "kernel_cmdlines")
    assert tree_files(outpost_repo.dir) == before, "a refused publish changed the repository"
    # Half of the flags is a usage error (clap's exit code 2).
    res = outpost_repo.publish(b"image", "1.0.0", check=False, extra=("--boot-kernel", boot / "vmlinuz"))
    assert res.returncode == 2 and "--boot-cmdline" in res.stderr, res.describe()
    cmdline_b = cmdline.replace("/vmlinuz", "(hd0,gpt3)/vmlinuz")
    doc = json_out(outpost_repo.publish(b"image", "1.0.0", extra=(*flags, "--boot-cmdline", cmdline,
                                                                "--boot-cmdline", cmdline_b, "--json")))
    signed = json.loads((outpost_repo.dir / "metadata" / "firmware.json").read_text())["signed"]["targets"]
    golden = signed["firmware/rpi4/1.0.0/fw.img"]["custom"]["outpost"]["golden"]
    assert golden == doc["golden"]
    authenticode = (EFI_IMAGE.parent / "small-pe32plus.efi.authenticode-sha256").read_text().strip()
    sha = lambda name: hashlib.sha256(files[name]).hexdigest()
    assert golden == {
        "bootloaders": [{"name": "small-pe32plus.efi", "sha256": authenticode}],
        "kernel": {"name": "vmlinuz", "sha256": sha("vmlinuz")},
        "initrd": {"name": "initrd.img", "sha256": sha("initrd.img")},
        "kernel_cmdlines": [cmdline, cmdline_b],
        "boot_files": [{"name": "grub.cfg", "sha256": sha("grub.cfg")}],
    }
