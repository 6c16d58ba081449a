"""Names of the PCI devices an AI factory meets most, for hosts without a udev hardware database."""

from __future__ import annotations

VENDORS: dict[int, str] = {
    0x10DE: "NVIDIA",
    0x15B3: "NVIDIA Mellanox",
    0x8086: "Intel",
    0x1022: "AMD",
    0x1000: "Broadcom / LSI",
    0x1AF4: "Red Hat (virtio)",
    0x1DA3: "Habana Labs",
    0x1B36: "Red Hat (QEMU)",
}

MODELS: dict[tuple[int, int], str] = {
    (0x10DE, 0x2330): "H100 80GB HBM3 (SXM5)",
    (0x10DE, 0x2331): "H100 PCIe",
    (0x10DE, 0x2321): "H100 NVL",
    (0x10DE, 0x2335): "H200 SXM 141GB",
    (0x10DE, 0x233B): "H200 NVL",
    (0x10DE, 0x2901): "B200",
    (0x10DE, 0x20B0): "A100 SXM4 40GB",
    (0x10DE, 0x20B2): "A100 SXM4 80GB",
    (0x10DE, 0x20B5): "A100 PCIe 80GB",
    (0x10DE, 0x26B5): "L40",
    (0x10DE, 0x26B9): "L40S",
    (0x10DE, 0x22A3): "NVSwitch (GH100)",
    (0x10DE, 0x1AF1): "NVSwitch (GA100)",
    (0x15B3, 0x101B): "ConnectX-6",
    (0x15B3, 0x101D): "ConnectX-6 Dx",
    (0x15B3, 0x101E): "ConnectX Family Virtual Function",
    (0x15B3, 0x1021): "ConnectX-7",
    (0x15B3, 0x1023): "ConnectX-8",
    (0x15B3, 0xA2D6): "BlueField-2",
    (0x15B3, 0xA2DC): "BlueField-3",
    (0x8086, 0x10D3): "82574L Gigabit (e1000e)",
    (0x8086, 0x1521): "I350 Gigabit",
    (0x1B36, 0x0010): "NVMe Controller (QEMU)",
}


def vendor_name(vendor_id: int) -> str:
    return VENDORS.get(vendor_id, f"vendor {vendor_id:04x}")


def model_name(vendor_id: int, device_id: int) -> str:
    return MODELS.get((vendor_id, device_id), f"device {vendor_id:04x}:{device_id:04x}")
