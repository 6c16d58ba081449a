"""What a tenant's VMs may use on the fabric: VLANs, VNIs, pkeys, and the risky VF switches.

The template's word alone never decides: a VLAN, VNI or pkey reaches the host only when the
tenant's grant contains it. :func:`grant_from_policy` builds the grant from the tenant policy
(``aifactory_core.policy``); anything else (tests, a vendor policy) may construct one directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aifactory_core.errors import PolicyRefused

if TYPE_CHECKING:
    from aifactory_core.one.vm import VmRequest
    from aifactory_core.policy.schema import Policy

Ranges = tuple[tuple[int, int], ...]
VXLAN_DRIVERS = {"vxlan": "VLAN_ID", "ovswitch_vxlan": "OUTER_VLAN_ID"}
"""OpenNebula's VXLAN ``VN_MAD`` drivers -> the attribute that holds the VNI (the one table the
frontend's policy decision and the host's network plugins read)."""


def _within(value: int, ranges: Ranges) -> bool:
    return any(low <= value <= high for low, high in ranges)


def _show(ranges: Ranges) -> str:
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges) or "none"


@dataclass(frozen=True)
class TenantNetworkGrant:
    """A tenant's network rights. Ranges are inclusive; pkeys are 15-bit (no membership bit)."""

    tenant: str
    vlans: Ranges = ()
    vnis: Ranges = ()
    pkeys: Ranges = ()
    full_member_pkeys: Ranges = ()
    """pkeys on which the tenant's ports are full members (may talk to every member); on every
    other granted pkey they are limited members (talk to full members only, never to each other)."""
    allow_untagged: bool = False
    allow_trust: bool = False
    allow_spoofchk_off: bool = False

    def check_vlan(self, vlan: int) -> None:
        if vlan == 0 and not self.allow_untagged:
            raise PolicyRefused(f"tenant {self.tenant} may not use an untagged VF")
        if vlan and not _within(vlan, self.vlans):
            raise PolicyRefused(f"VLAN {vlan} is outside tenant {self.tenant}'s vlans {_show(self.vlans)}")

    def check_vni(self, vni: int) -> None:
        if not _within(vni, self.vnis):
            raise PolicyRefused(f"VNI {vni} is outside tenant {self.tenant}'s vnis {_show(self.vnis)}")

    def membership(self, pkey: int) -> str:
        """``full`` or ``limited`` for a granted pkey; refuses a pkey the tenant was not granted."""
        if not _within(pkey, self.pkeys):
            raise PolicyRefused(f"pkey {pkey:#06x} is outside tenant {self.tenant}'s ib_pkeys {_show(self.pkeys)}")
        return "full" if _within(pkey, self.full_member_pkeys) else "limited"


def grant_from_policy(policy: Policy, request: VmRequest, *, full_membership: bool = True) -> TenantNetworkGrant:
    """The grant of the VM owner's tenant, after the policy's own admission decision admits it."""
    from aifactory_core.policy.decide import decide

    decision = decide(policy, request)
    if not decision.admitted:
        raise PolicyRefused(decision.reason)
    tenant = policy.tenant_for(request.gid, request.gname)
    if tenant is None:
        raise PolicyRefused(f"group {request.gname or request.gid} belongs to no tenant")
    pkeys = tenant.ib_pkeys.ranges
    return TenantNetworkGrant(tenant=tenant.key, vlans=tenant.vlans.ranges, vnis=tenant.vnis.ranges, pkeys=pkeys,
                              full_member_pkeys=pkeys if full_membership else ())
