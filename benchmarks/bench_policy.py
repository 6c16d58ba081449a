"""Tenant policy: admission hook cost per event, and decision time at 1,000 tenants / 10,000 VMs.

    .venv/bin/python benchmarks/bench_policy.py [--rounds N] [--importtime]

1. Whole-process wall time of the admission hook per event, interleaved round by round with the
   baseline ``python -c pass`` (the same interpreter), reported as medians and ratios:
   - ``failed call``: an API event whose call failed in oned (RESULT 0) — decided without oned;
   - ``no devices``: ``one.vm.allocate`` whose EXTRA VM asks for no device or NIC — no oned;
   - ``release via oned``: the ``one.template.instantiate`` sample; the hook fetches the VM and the
     tenant's pool from the XML-RPC test server (``tests/onetestserver.py``) and releases it over
     HTTP on 127.0.0.1 with the lean transport (:mod:`aifactory_core.one.xmlrpc`, the default);
   - ``release via oned, pyone``: the same event with ``Oned``'s transport switched to pyone (what
     the hook used before the lean transport; kept as the in-run comparison).
   Also shown, as floors: ``python -c "import lxml.etree"`` (the parser every decision needs, so the
   lowest cost any hook that parses XML can have) and ``python -c "import http.client"`` (what a
   transport on http.client would add, measured against the plain-socket one).
   Before measuring, ``compileall`` writes the bytecode of ``aifactory_core`` (as ``pip install``
   does) and the children run without ``PYTHONDONTWRITEBYTECODE``: otherwise every changed module
   is compiled from source on every event and the numbers measure the compiler.
   - ``client -> server``: the hook executable as installed (:mod:`aifactory_core.policy.hookclient`)
     handing the event to a running ``aifactory hook-server`` (started by the benchmark on a
     private socket): the event's cost is the interpreter, ``socket`` and the server's decision;
     ``client, no server``: the same executable when no server listens (it decides itself).
   ``--importtime`` adds a ``python -X importtime`` breakdown of one release-via-oned run: the
   modules with the largest cumulative import time.
2. ``decide`` on a policy of 1,000 tenants with a usage index of 10,000 VMs: policy parse time,
   usage index build time, and the median time per decision over 10,000 requests.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "tests" / "fixtures" / "opennebula" / "samples" / "synthesized"
PYTHON = sys.executable


def _call_info(name: str, result: str = "1") -> bytes:
    text = (SAMPLES / name).read_bytes()
    start = text.rindex(b"<CALL_INFO>")
    end = text.index(b"</CALL_INFO>") + len(b"</CALL_INFO>")
    return base64.b64encode(text[start:end].replace(b"<RESULT>1</RESULT>", f"<RESULT>{result}</RESULT>".encode()))


def _no_device_allocate() -> bytes:
    text = (SAMPLES / "hook_message_api_vm_allocate.xml").read_bytes()
    start, end = text.rindex(b"<CALL_INFO>"), text.index(b"</CALL_INFO>") + len(b"</CALL_INFO>")
    body = text[start:end]
    cut_start = body.index(b"<PCI>")
    body = body[:cut_start] + body[body.index(b"</PCI>") + len(b"</PCI>") :]
    return base64.b64encode(body)


def _run(command: list[str], stdin: bytes, env: dict[str, str]) -> float:
    began = time.perf_counter()
    result = subprocess.run(command, input=stdin, capture_output=True, env=env, check=False)
    elapsed = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"{command}: exit {result.returncode}: {result.stderr.decode()[:300]}")
    return elapsed


_PYONE_HOOK = (
    "import runpy, sys; import aifactory_core.policy.oned as oned; "
    "oned.Oned.__init__.__defaults__ = (None, None, 30.0, 'pyone'); sys.argv[0] = 'hookmain'; "
    "runpy.run_module('aifactory_core.policy.hookmain', run_name='__main__')"
)


def _importtime(command: list[str], stdin: bytes, env: dict[str, str], top: int = 15) -> None:
    result = subprocess.run([command[0], "-X", "importtime", *command[1:]], input=stdin, capture_output=True,
                            env=env, check=False)  # fmt: skip
    rows = []
    for line in result.stderr.decode().splitlines():
        fields = line.removeprefix("import time:").split("|")
        if line.startswith("import time:") and len(fields) == 3 and fields[0].strip().isdigit():
            rows.append((int(fields[1]), int(fields[0]), fields[2][1:].rstrip()))
    total_own = sum(own for _, own, _ in rows)
    print(f"  python -X importtime, release via oned: {len(rows)} modules, {total_own / 1000:.1f} ms self time in all")
    print("    top-level imports by cumulative time (us):")
    for cumulative, own, name in sorted((row for row in rows if not row[2].startswith(" ")), reverse=True)[:top]:
        print(f"    {cumulative:8d} {own:8d}  {name}")


def bench_hook(rounds: int, importtime: bool = False) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from onetestserver import OneTestServer

    server = OneTestServer().start()
    work = Path(tempfile.mkdtemp(prefix="bench-policy-"))
    policy = work / "policy.toml"
    policy.write_text(
        '[tenant.a]\ngroup = "tenant-a"\ngroup_id = 100\nclusters = [100]\nmax_gpus = 8\nnetworks = [0, 7]\n'
        'vlans = ["1000-1009"]\n[[tenant.a.devices]]\nname = "H100"\nvendor = "10de"\ndevice = "2330"\n'
    )  # fmt: skip
    auth = work / "one_auth"
    auth.write_text("oneadmin:bench\n")
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(REPO / "aifactory_core")], check=True, capture_output=True)
    (work / "run").mkdir(mode=0o700)
    socket_path = work / "run" / "hooks.sock"
    env = {**os.environ, "AIFACTORY_POLICY": str(policy), "AIFACTORY_CONFIG": str(work / "none.conf"),
           "ONE_XMLRPC": server.endpoint, "ONE_AUTH": str(auth), "AIFACTORY_ACCOUNTING_DIR": str(work / "state"),
           "AIFACTORY_HOOK_SOCKET": str(work / "no-server.sock")}  # fmt: skip
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    hook = [PYTHON, "-m", "aifactory_core.policy.hookmain", "admission"]
    client = [PYTHON, "-m", "aifactory_core.policy.hookclient", "admission"]
    served = {**env, "AIFACTORY_HOOK_SOCKET": str(socket_path)}
    aifactory = str(Path(PYTHON).parent / "aifactory")
    hook_server = subprocess.Popen([aifactory, "hook-server", "--socket", str(socket_path)], env=env,
                                   stderr=subprocess.DEVNULL)
    try:
        while not socket_path.is_socket():
            if hook_server.poll() is not None:
                raise SystemExit("hook server did not start")
            time.sleep(0.05)
        cases = {
            "python -c pass": ([PYTHON, "-c", "pass"], b""),
            "python -c 'import lxml.etree'": ([PYTHON, "-c", "import lxml.etree"], b""),
            "python -c 'import http.client'": ([PYTHON, "-c", "import http.client"], b""),
            "hook: failed call": (hook, _call_info("hook_api_call_info_template_instantiate.xml", "0")
                                  + b" one.template.instantiate"),
            "hook: no devices": (hook, _no_device_allocate() + b" one.vm.allocate"),
            "hook: release via oned": (hook, _call_info("hook_api_call_info_template_instantiate.xml")
                                       + b" one.template.instantiate"),
            "hook: release via oned, pyone": ([PYTHON, "-c", _PYONE_HOOK, "admission"],
                                              _call_info("hook_api_call_info_template_instantiate.xml")
                                              + b" one.template.instantiate"),
            "client, no server: release": (client, _call_info("hook_api_call_info_template_instantiate.xml")
                                           + b" one.template.instantiate"),
            "client -> server: failed call": (client, _call_info("hook_api_call_info_template_instantiate.xml", "0")
                                              + b" one.template.instantiate"),
            "client -> server: no devices": (client, _no_device_allocate() + b" one.vm.allocate"),
            "client -> server: release": (client, _call_info("hook_api_call_info_template_instantiate.xml")
                                          + b" one.template.instantiate"),
        }  # fmt: skip
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(rounds):
            server.add_vm(42, state=2)  # the sample VM, on hold again for the release case
            for name, (command, stdin) in cases.items():
                if "release" in name:
                    server.add_vm(42, state=2)
                times[name].append(_run(command, stdin, served if "-> server" in name else env))
        if importtime:
            server.add_vm(42, state=2)
            release = cases["hook: release via oned"]
            _importtime(release[0], release[1], env)
    finally:  # a failed run leaves no server behind
        server.stop()
        hook_server.terminate()
        hook_server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(times["python -c pass"])
    print(f"admission hook, whole process, median of {rounds} interleaved rounds:")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:34s} {median * 1000:8.1f} ms   {median / base:5.2f}x python -c pass")


def bench_decide() -> None:
    from aifactory_core.one.vm import NicRequest, PciRequest, VmRequest
    from aifactory_core.policy.decide import Usage, decide
    from aifactory_core.policy.schema import parse_policy

    rng = random.Random(7)
    lines = []
    for index in range(1000):
        vni, pkey = 100000 + index * 16, 0x100 + index * 8
        lines.append(f'[tenant.t{index}]\ngroup = "g{index}"\ngroup_id = {1000 + index}\nclusters = [100, 101]\n'
                     f"max_gpus = 8\nnetworks = [{index}, {index + 5000}]\n"
                     f'vlans = ["{index * 4}-{index * 4 + 3}"]\nvnis = ["{vni}-{vni + 15}"]\n'
                     f'ib_pkeys = ["{hex(pkey)}-{hex(pkey + 7)}"]\n'
                     f'[[tenant.t{index}.devices]]\nname = "H100"\nvendor = "10de"\ndevice = "2330"\n'
                     "clusters = [100]\n")  # fmt: skip
    text = "\n".join(lines)
    began = time.perf_counter()
    policy = parse_policy(text, "bench.toml")
    parse_s = time.perf_counter() - began
    began = time.perf_counter()
    usage = Usage.of((vm, f"t{rng.randrange(1000)}", rng.randint(0, 2)) for vm in range(10_000))
    usage_s = time.perf_counter() - began

    def gpu(vendor: int, device: int) -> PciRequest:
        return PciRequest(pci_id=0, type=None, address=None, short_address=None, vendor=vendor, device=device,
                          device_class=0x0302, numa_node=None, nic_id=None, network=None, network_id=None,
                          vlan_id=None, mac=None, phydev=None, vn_mad=None, vm_address=None, vm_bus=None,
                          vm_bus_index=None, uuid=None, profile=None, mdev_mode=None)  # fmt: skip

    requests = []
    for vm in range(10_000):
        tenant = rng.randrange(1000)
        nics = tuple(NicRequest(nic_id=n, name=None, network=None, network_id=tenant, mac=None, ip=None,
                                vlan_id=tenant * 4 + n, bridge=None, phydev=None, vn_mad="802.1Q", model=None,
                                target=None, security_groups=()) for n in range(2))  # fmt: skip
        requests.append(VmRequest(
            vm_id=vm, name=None, uid=1, gid=1000 + tenant, uname=None, gname=None, state=None, lcm_state=None,
            deploy_id=None, host=None, host_id=None, cluster_id=100,
            pci=tuple(gpu(0x10DE, 0x2330) for _ in range(rng.randint(1, 4))), nics=nics, topology=None,
            numa_nodes=(), vcpu=None, cpu=None, memory_mib=None, hugepage_size=None, template_id=None))  # fmt: skip
    per: list[float] = []
    admitted = 0
    for request in requests:
        began = time.perf_counter()
        decision = decide(policy, request, usage)
        per.append(time.perf_counter() - began)
        admitted += decision.admitted
    print("decision with 1,000 tenants and a usage index of 10,000 VMs:")
    print(f"  parse + validate the 1,000-tenant policy: {parse_s * 1000:.1f} ms ({len(text) // 1024} KiB)")
    print(f"  build the usage index of 10,000 VMs:      {usage_s * 1000:.1f} ms")
    print(f"  decide, median per request:                {statistics.median(per) * 1e6:.1f} us "
          f"(p99 {sorted(per)[int(len(per) * 0.99)] * 1e6:.1f} us; {admitted}/{len(per)} admitted)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--importtime", action="store_true", help="add a -X importtime breakdown of the hook")
    args = parser.parse_args()
    bench_decide()
    bench_hook(args.rounds, args.importtime)


if __name__ == "__main__":
    main()
