import pytest

from aifactory_core import validate
from aifactory_core.errors import UsageError


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("0000:00:06.0", "0000:00:06.0"),
        ("0000:17:00.1", "0000:17:00.1"),
        ("17:00.0", "0000:17:00.0"),
        ("0000:17:00:0", "0000:17:00.0"),  # OpenNebula's ADDRESS form
        ("0000:9F:1F.7", "0000:9f:1f.7"),
    ],
)
def test_pci_address_accepts_canonical_forms(text: str, canonical: str) -> None:
    assert validate.pci_address(text) == canonical


@pytest.mark.parametrize(
    "text",
    ["../0000:00:06.0", "0000:00:06.0/../../x", "000:00:06.0", "0000:0:06.0", "0000:00:6.0", "0000:00:06.8",
     "0000:00:20.0", "0000:00:06", "", " ", "0000:00:06.0\n0000:00:07.0", "00000:00:06.0", 42],
)
def test_pci_address_refuses_everything_else(text: object) -> None:
    with pytest.raises(UsageError) as caught:
        validate.pci_address(text)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["vfio-pci", "nvidia", "mlx5_core", "e1000e", "nvidia-nvswitch"])
def test_driver_names_accepted(name: str) -> None:
    assert validate.driver_name(name) == name


@pytest.mark.parametrize("name", ["../nvidia", "vfio pci", "vfio/pci", "", "-rf", "a" * 65, "vfio-pci\n"])
def test_driver_names_refused(name: str) -> None:
    with pytest.raises(UsageError):
        validate.driver_name(name)


@pytest.mark.parametrize("name", ["eth0", "ens1f0np0", "eni7np1", "br-tenant.100"])
def test_ifnames_accepted(name: str) -> None:
    assert validate.ifname(name) == name


@pytest.mark.parametrize("name", ["eth/0", "..", "a" * 16, "eth 0", ""])
def test_ifnames_refused(name: str) -> None:
    with pytest.raises(UsageError):
        validate.ifname(name)


def test_mac_refuses_multicast_and_garbage() -> None:
    assert validate.mac_address("02:00:0A:0A:00:2A") == "02:00:0a:0a:00:2a"
    for bad in ("01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", "02:00:0a:0a:00", "zz:00:0a:0a:00:2a"):
        with pytest.raises(UsageError):
            validate.mac_address(bad)


def test_int_in_range() -> None:
    assert validate.int_in_range("4094", 0, 4094, "VLAN") == 4094
    for bad in ("4095", "-1", "1e3", True, "0x10", None):
        with pytest.raises(UsageError):
            validate.int_in_range(bad, 0, 4094, "VLAN")
