"""Host and disk tiers under the device prefix cache: a KV connector (`kv/connector.py`).

`scheduler.py` is its scheduler side (the indexes, the transfers), `worker.py` its worker side
(the host pool, the copies, the disk threads), `disk.py` the disk folder and entry format.
`build_tiers` makes the pair for an engine.
"""

from __future__ import annotations

import logging

import torch

from xllm.kv.tiers.disk import DiskStore, entry_bytes
from xllm.kv.tiers.scheduler import TierScheduler
from xllm.kv.tiers.worker import TierWorker

logger = logging.getLogger(__name__)

__all__ = ["DiskStore", "TierScheduler", "TierWorker", "build_tiers"]

STAGING_BYTES = 64 << 20  # host memory for disk reads and writes when there is no host tier
WRITE_QUEUE_BYTES = 256 << 20  # disk writes waiting for the writer thread, at most


def build_tiers(
    kv_caches: list[torch.Tensor], host_bytes: int, disk_dir: str | None, disk_bytes: int,
    fingerprint: tuple[bytes, dict] | None = None, host_buffer=None,
) -> tuple[TierScheduler, TierWorker]:
    """The two sides of the tiers over a runner's per-layer caches [2, num_blocks, block_size, Hkv, D].
    A disk tier needs the KV `fingerprint` (`kv/fingerprint.py`): its folder is keyed by it. The
    host pool comes from `host_buffer(shape, dtype)` (the platform's; plain memory by default)."""
    _, _, bs, hkv, d = kv_caches[0].shape
    block_bytes = len(kv_caches) * 2 * bs * hkv * d * kv_caches[0].element_size()
    host_slots = host_bytes // block_bytes
    disk = None
    if disk_dir and disk_bytes > 0:
        if fingerprint is None:
            raise ValueError("a disk KV tier needs the cache's fingerprint")
        disk = DiskStore(disk_dir, fingerprint[0], fingerprint[1], block_bytes, WRITE_QUEUE_BYTES)
    slots = host_slots if host_slots else max(1, STAGING_BYTES // block_bytes) if disk else 0
    scheduler = TierScheduler(
        slots, host_tier=host_slots > 0, disk_entry_bytes=entry_bytes(block_bytes) if disk else 0,
        disk_limit=disk_bytes if disk else 0, disk_entries=disk.scan() if disk else (),
    )
    logger.info(
        "prefix-cache tiers: host %d blocks (%.2f GiB%s), disk %s", slots, slots * block_bytes / (1 << 30),
        "" if host_slots else ", staging only",
        f"{disk.folder} ({scheduler.num_disk_entries} entries kept, up to {disk_bytes / (1 << 30):g} GiB)" if disk else "off",
    )
    return scheduler, TierWorker(kv_caches, slots, disk, host_buffer)
