"""``aifactory vm FILE|-``: every hostile or broken document is one line on stderr and exit 2."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aifactory_core.cli import main

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "tests" / "fixtures" / "opennebula" / "samples" / "synthesized"

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE VM [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<VM><ID>1</ID><NAME>&x;</NAME></VM>
"""


def billion_laughs() -> bytes:
    entities = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    return f'<!DOCTYPE VM [<!ENTITY l0 "lol">{entities}]><VM><ID>1</ID><NAME>&l9;</NAME></VM>'.encode()


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["vm", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_refused(status: int, out: str, err: str, fragment: str) -> None:
    assert status == 2
    assert out == ""
    assert err.startswith("aifactory: ") and err.endswith("\n")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert fragment in err


def test_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_cli(capsys, str(SAMPLES / "vm_gpu_pinned.xml"))
    assert (status, err) == (0, "")
    assert out.startswith("VM 42  name llm-train-42\n")
    assert "owner alice (uid 5)  group tenant-a (gid 100)" in out
    assert "host gpu-node-01 (id 3)" in out
    assert "pci 0 device: 0000:17:00.0  10de:2330 class 0302  numa 0" in out
    assert "pci 1 nic: 0000:18:00.2  15b3:101e" in out and "vlan 1001" in out
    assert "numa node 0: 4 vcpus on host cpus 0,8,1,9" in out


@pytest.mark.parametrize(
    "name",
    ["vm_gpu_pinned.xml", "vmm_driver_action_deploy.xml", "hook_message_state_vm_running.xml", "vnm_action_vm.b64"],
)
def test_json_output_for_every_envelope(capsys: pytest.CaptureFixture[str], name: str) -> None:
    status, out, err = run_cli(capsys, "--json", str(SAMPLES / name))
    assert (status, err) == (0, "")
    data = json.loads(out)
    assert data["vm_id"] == 42
    assert data["host"] == "gpu-node-01"
    assert any(pci["address"] == "0000:18:00.2" and pci["vlan_id"] == 1001 for pci in data["pci"])


def test_stdin_base64(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = base64.b64encode((SAMPLES / "vm_gpu_pinned.xml").read_bytes())
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(encoded)))
    status, out, err = run_cli(capsys, "--base64", "--json", "-")
    assert (status, err) == (0, "")
    assert json.loads(out)["uname"] == "alice"


def test_terminal_control_characters_are_escaped(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # C1 controls (CSI U+009B) are legal in XML 1.0 and would drive a terminal: shown escaped.
    document = tmp_path / "vm.xml"
    document.write_text("<VM><ID>1</ID><NAME>evil\u009b2J&#x9;x</NAME></VM>", encoding="utf-8")
    status, out, _ = run_cli(capsys, str(document))
    assert status == 0
    assert "\u009b" not in out and "\t" not in out
    assert "name evil\\x9b2J\\tx" in out


@pytest.mark.parametrize(
    ("content", "extra", "fragment"),
    [
        (XXE, [], "DOCTYPE with entity declarations"),
        (billion_laughs(), [], "DOCTYPE with entity declarations"),
        (b"<VM><ID>1</ID><NAME>" + b"a" * (50 * 1024 * 1024) + b"</NAME></VM>", [], "16777216-byte"),
        (b"PFZNPjxJRD4xPC9JRD48L1ZNPg=*=", [], "invalid base64"),
        (b"PFZNPjxJRD4xPC9JRD48L1ZNPg==", ["--xml"], "not well-formed"),
        (b"<VM><ID>1</ID></VM>", ["--base64"], "invalid base64"),
        (base64.b64encode(XXE), [], "DOCTYPE with entity declarations"),
        (b"<VM><ID>x</ID></VM>", [], "VM/ID 'x': not an integer"),
        (b"<HOST><ID>1</ID></HOST>", [], "found <HOST>"),
        (b"<VM><ID>1</ID>", [], "not well-formed"),
        (b"\xff\xfe<\x00V\x00M\x00/\x00>\x00", [], "not UTF-8"),
        (b"<VM><ID>1</ID><NAME>" + b"a" * 2000 + b"</NAME></VM>", ["--max-bytes", "1000"], "1000-byte"),
    ],
)
def test_hostile_documents_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes, extra: list[str], fragment: str
) -> None:
    document = tmp_path / "doc"
    document.write_bytes(content)
    status, out, err = run_cli(capsys, *extra, str(document))
    assert_refused(status, out, err, fragment)


def test_missing_file_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, err = run_cli(capsys, str(tmp_path / "absent.xml"))
    assert_refused(status, out, err, "cannot read")


def test_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["vm", "--xml", "--base64", "-"])
    assert caught.value.code == 2
    assert "not allowed with" in capsys.readouterr().err
    status, out, err = run_cli(capsys, "--max-bytes", "0", "-")
    assert_refused(status, out, err, "--max-bytes")


def test_real_subprocess_xxe_over_stdin() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("AIFACTORY_DEBUG", None)
    result = subprocess.run(
        [sys.executable, "-c", "from aifactory_core.cli import main; raise SystemExit(main())", "vm", "-"],
        input=XXE, capture_output=True, timeout=60, check=False, env=env, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == b""
    assert result.stderr == b"aifactory: VM document standard input has a DOCTYPE with entity declarations; refused\n"
