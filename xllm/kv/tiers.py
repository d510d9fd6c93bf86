"""Lower tiers of the prefix cache: a host pool and a bounded disk folder, below the KV blocks.

A cached block the device pool evicts (to reuse it) is demoted, content and hash, to the host
tier; the host tier's least recently used entry is demoted in turn to the disk tier, whose
oldest files are deleted past its size bound. A prefix lookup that runs out of device hits goes
on down the tiers: a block found in the host or disk tier is promoted back into a free device
block (filed in the device index, so the request then takes it like any cache hit).

On this CPU engine "device" and "host" are both RAM: the host tier is a second, preallocated
pool, and a promotion is a copy of the block's rows in every layer (the GPU version copies over
PCIe; the interface is the same). Disk entries are written to a temporary file and renamed into
place (a crash mid-write leaves no entry under the final name) and carry a sha256 of their
payload: a torn or corrupted entry is detected when read, deleted and counted, never used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

logger = logging.getLogger(__name__)

_MAGIC = b"XLLMKV01"
_HEADER = struct.Struct("<8s32sQ")  # magic, sha256 of the payload, payload length


def read_entry(path: str) -> bytes | None:
    """A disk entry's payload if the file is whole and its checksum matches, else None. Pure (no
    shared state), so it runs in a worker thread."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if len(data) < _HEADER.size:
        return None
    magic, digest, length = _HEADER.unpack_from(data)
    payload = data[_HEADER.size :]
    if magic != _MAGIC or length != len(payload) or hashlib.sha256(payload).digest() != digest:
        return None
    return payload


class DiskTier:
    """Block payloads as files `<hash hex>.kv` under `folder`, at most `max_bytes` in all (LRU)."""

    def __init__(self, folder: str, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        os.makedirs(folder, exist_ok=True)
        self._index: OrderedDict[bytes, int] = OrderedDict()  # hash -> file size, oldest first
        self.num_corrupt = 0
        entries = []
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if name.endswith(".tmp"):  # a write that never finished
                os.unlink(path)
            elif name.endswith(".kv") and len(name) == 64 + 3:
                st = os.stat(path)
                entries.append((st.st_mtime, bytes.fromhex(name[:64]), st.st_size))
        for _, h, size in sorted(entries):
            self._index[h] = size
        self._evict_to(self.max_bytes)

    def _path(self, block_hash: bytes) -> str:
        return os.path.join(self.folder, block_hash.hex() + ".kv")

    @property
    def used_bytes(self) -> int:
        return sum(self._index.values())

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._index

    def __len__(self) -> int:
        return len(self._index)

    def _evict_to(self, limit: int) -> None:
        total = self.used_bytes
        while self._index and total > limit:
            h, size = self._index.popitem(last=False)
            total -= size
            try:
                os.unlink(self._path(h))
            except FileNotFoundError:
                pass

    def put(self, block_hash: bytes, payload: bytes) -> None:
        size = _HEADER.size + len(payload)
        if size > self.max_bytes:
            return
        if block_hash in self._index:
            self._index.move_to_end(block_hash)
            return
        self._evict_to(self.max_bytes - size)
        path = self._path(block_hash)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, hashlib.sha256(payload).digest(), len(payload)))
            f.write(payload)
        os.replace(tmp, path)  # atomic: the entry exists whole or not at all
        self._index[block_hash] = size

    def get(self, block_hash: bytes) -> bytes | None:
        """The payload, or None when absent or damaged (a damaged entry is deleted)."""
        if block_hash not in self._index:
            return None
        return self.settle(block_hash, read_entry(self._path(block_hash)))

    def read_async(self, block_hash: bytes, pool) -> object:
        """Start reading and checking an entry in `pool` (a thread pool); `settle` its result later."""
        return pool.submit(read_entry, self._path(block_hash))

    def settle(self, block_hash: bytes, payload: bytes | None) -> bytes | None:
        """Account for a read of `block_hash`: a damaged or vanished entry leaves the index."""
        if block_hash not in self._index:
            return None
        if payload is None:
            self.num_corrupt += 1
            logger.warning("disk KV entry %s is damaged or gone; ignored (the block is recomputed)", block_hash.hex())
            del self._index[block_hash]
            try:
                os.unlink(self._path(block_hash))
            except FileNotFoundError:
                pass
            return None
        self._index.move_to_end(block_hash)
        return payload


class KVTiers:
    """The host and disk tiers under the device KV cache of one model runner.

    `kv_caches` are the runner's per-layer tensors [2, num_blocks, block_size, Hkv, D]; a block's
    content is its rows in every layer, [L, 2, block_size, Hkv, D].
    """

    def __init__(self, kv_caches: list[torch.Tensor], host_blocks: int, disk_folder: str | None = None, disk_bytes: int = 0):
        self.kv_caches = kv_caches
        _, _, bs, hkv, d = kv_caches[0].shape
        self.block_shape = (len(kv_caches), 2, bs, hkv, d)
        self.dtype = kv_caches[0].dtype
        self.host_blocks = host_blocks
        self._host = torch.empty((host_blocks, *self.block_shape), dtype=self.dtype) if host_blocks else None
        self._host_index: OrderedDict[bytes, int] = OrderedDict()  # hash -> host slot, LRU first
        self._host_free = list(range(host_blocks))
        self.disk = DiskTier(disk_folder, disk_bytes) if disk_folder and disk_bytes > 0 else None
        self.hits = {"host": 0, "disk": 0}  # blocks promoted from each tier
        # Disk reads run here, off the scheduling path; a request whose chain goes on into the disk
        # tier waits (running requests keep stepping) until its blocks are read and checked.
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xllm-kv-disk") if self.disk is not None else None
        self._loading: dict[bytes, Future] = {}
        # Blocks read ahead from disk, waiting for their promotion (bounded; the oldest are dropped).
        self._staged: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    @property
    def block_bytes(self) -> int:
        return torch.Size(self.block_shape).numel() * self.dtype.itemsize

    def tier_of(self, block_hash: bytes) -> str | None:
        if block_hash in self._host_index:
            return "host"
        if block_hash in self._staged or (self.disk is not None and block_hash in self.disk):
            return "disk"
        return None

    def _read_block(self, block: int) -> torch.Tensor:
        return torch.stack([cache[:, block] for cache in self.kv_caches])

    def _write_block(self, block: int, data: torch.Tensor) -> None:
        for cache, rows in zip(self.kv_caches, data):
            cache[:, block].copy_(rows)

    def _from_payload(self, payload: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(self.dtype).view(self.block_shape)

    def _payload(self, data: torch.Tensor) -> bytes:
        return data.contiguous().view(torch.uint8).numpy().tobytes()

    def _host_put(self, block_hash: bytes, data: torch.Tensor) -> None:
        if self._host is None:
            if self.disk is not None:
                self.disk.put(block_hash, self._payload(data))
            return
        if block_hash in self._host_index:
            self._host_index.move_to_end(block_hash)
            return
        if self._host_free:
            slot = self._host_free.pop()
        else:
            old, slot = self._host_index.popitem(last=False)  # LRU host entry goes down to disk
            if self.disk is not None:
                self.disk.put(old, self._payload(self._host[slot]))
        self._host[slot].copy_(data)
        self._host_index[block_hash] = slot

    def load_pending(self, hashes: list[bytes], wait: bool = False) -> bool:
        """For a chain whose next blocks are on disk: read them in the background (all of the chain's
        leading disk blocks at once) and return True while some are still being read. Finished
        reads are checked and staged for `promote` (a damaged entry ends the chain there). With
        `wait`, block until the reads are done (when nothing else could run meanwhile)."""
        if self.disk is None:
            return False
        pending = False
        for h in hashes:
            if h in self._host_index or h in self._staged:
                continue
            future = self._loading.get(h)
            if future is None:
                if h not in self.disk:
                    break
                future = self._loading[h] = self.disk.read_async(h, self._reader)
            if wait:
                future.result()
            if not future.done():
                pending = True
                continue
            del self._loading[h]
            payload = self.disk.settle(h, future.result())
            if payload is None:
                break
            self._staged[h] = self._from_payload(payload)
            while len(self._staged) > 4096:
                self._staged.popitem(last=False)
        return pending

    def demote(self, block: int, block_hash: bytes) -> None:
        """Device block `block` (holding `block_hash`) is about to be reused: keep its content below."""
        self._host_put(block_hash, self._read_block(block))

    def promote(self, block_hash: bytes, block: int) -> bool:
        """Copy `block_hash`'s content into device block `block`; False if no tier has it intact."""
        slot = self._host_index.get(block_hash)
        if slot is not None:
            self._host_index.move_to_end(block_hash)
            self._write_block(block, self._host[slot])
            self.hits["host"] += 1
            return True
        data = self._staged.pop(block_hash, None)
        if data is None:
            payload = self.disk.get(block_hash) if self.disk is not None else None
            if payload is None:
                return False
            data = self._from_payload(payload)
        self._write_block(block, data)
        self._host_put(block_hash, data)  # recently used: keep it in the faster tier too
        self.hits["disk"] += 1
        return True
