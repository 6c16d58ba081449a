"""Below NUMA: which NIC sits behind the same PCIe switch as a GPU (the GPUDirect RDMA path).

From the PCI tree (``PciDevice.parent`` chains), not the node number: two functions share a
switch when their deepest common upstream bridge is not a root port, i.e. the common part of
their bridge chains is at least two bridges long (root port, then switch upstream port).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def upstream_chain(address: str, parents: Mapping[str, str | None]) -> tuple[str, ...]:
    """Bridges above ``address``, from the root port down to its direct parent."""
    chain: list[str] = []
    current = parents.get(address)
    while current is not None and current not in chain and len(chain) < 64:
        chain.append(current)
        current = parents.get(current)
    return tuple(reversed(chain))


def shared_depth(first: str, second: str, parents: Mapping[str, str | None]) -> int:
    """How many upstream bridges the two functions have in common."""
    depth = 0
    for mine, theirs in zip(upstream_chain(first, parents), upstream_chain(second, parents), strict=False):
        if mine != theirs:
            break
        depth += 1
    return depth


def same_switch(first: str, second: str, parents: Mapping[str, str | None]) -> bool:
    return shared_depth(first, second, parents) >= 2


def pair_gpus_with_nics(
    gpus: Iterable[str], nics: Iterable[str], parents: Mapping[str, str | None]
) -> tuple[tuple[str, str], ...]:
    """Pair each GPU with an unpaired NIC behind the same switch (deepest shared bridge first)."""
    free = sorted(nics)
    pairs: list[tuple[str, str]] = []
    for gpu in sorted(gpus):
        ranked = sorted((-shared_depth(gpu, nic, parents), nic) for nic in free if same_switch(gpu, nic, parents))
        if ranked:
            nic = ranked[0][1]
            free.remove(nic)
            pairs.append((gpu, nic))
    return tuple(pairs)
