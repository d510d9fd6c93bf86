"""The scheduler side of the host/disk tiers: which block hash lives where, and the transfers.

It keeps the index of the host pool (hash -> slot, least recently used first) and of the disk
folder (hash -> entry, oldest first, bounded in bytes), and turns the device pool's evictions and
the prefix lookups into transfers for the worker side (`worker.py`), in order, in the step's
`KVConnectorMeta`. It never touches KV data or files.

- A cached device block about to be reused is saved to a host slot. A host slot that is needed
  again gives its entry to the disk tier (a spill) unless the disk already has it.
- A lookup that runs past the device hits loads the chain's leading host entries (`available`,
  `load`); if the chain goes on into disk entries, reads of them into host slots start
  (`fetch`), and the request waits until they finish (reported by the worker, `update`) and
  asks again. Host slots are the only memory reads land in, so what staged reads hold is
  bounded in bytes; a read whose request went away still ends in its slot, which is then an
  ordinary host entry.
- Without a host tier (disk only) the pool is a small staging area: a save is spilled at once
  and its slot freed.
"""

from __future__ import annotations

from collections import OrderedDict

from xllm.kv.connector import KVConnectorMeta, KVConnectorOutput, KVTransfer


class TierScheduler:
    def __init__(self, num_slots: int, host_tier: bool, disk_entry_bytes: int = 0, disk_limit: int = 0,
                 disk_entries: list[bytes] = ()):
        self.num_slots = num_slots
        self.host_tier = host_tier  # False: the slots only stage disk reads and writes
        self._free = list(range(num_slots))[::-1]
        self._host: OrderedDict[bytes, int] = OrderedDict()  # hash -> slot whose content is that block
        self._reading: dict[bytes, int] = {}  # hash -> slot a disk read is filling
        self._from_disk: set[bytes] = set()  # host entries read from disk, not loaded since
        self.disk_enabled = disk_limit > 0
        self._disk: OrderedDict[bytes, None] = OrderedDict()  # entries, oldest first
        self.disk_entry_bytes = disk_entry_bytes
        self.disk_limit = disk_limit
        self._transfers: list[KVTransfer] = []
        # Slots of the entries the current lookup is loading (`available` until `load`): the device
        # allocations in between may evict blocks, whose saves must not take these slots.
        self._pinned: set[int] = set()
        self.hits = {"host": 0, "disk": 0}  # blocks loaded back from each tier
        self.num_corrupt = 0  # disk entries found damaged or foreign when read
        self.num_lost = 0  # disk writes dropped by the worker
        for h in disk_entries:  # a restart: oldest first; past the bound (a smaller one now) the oldest go
            self._disk_add(h)

    # ---- where a hash is ------------------------------------------------------------------
    def tier_of(self, block_hash: bytes) -> str | None:
        if block_hash in self._host:
            return "host"
        if block_hash in self._reading or block_hash in self._disk:
            return "disk"
        return None

    @property
    def reads_pending(self) -> bool:
        return bool(self._reading)

    @property
    def num_disk_entries(self) -> int:
        return len(self._disk)

    @property
    def disk_bytes(self) -> int:
        return len(self._disk) * self.disk_entry_bytes

    # ---- slots ------------------------------------------------------------------------------
    def _take_slot(self, keep: set[int] = frozenset()) -> int | None:
        """A free slot, or the least recently used host entry's (spilled to disk first), never one
        in `keep`; None when every slot is being read into or kept."""
        if self._free:
            return self._free.pop()
        for h, slot in self._host.items():
            if slot not in keep and slot not in self._pinned:
                break
        else:
            return None
        del self._host[h]
        self._from_disk.discard(h)
        if self.disk_enabled and h not in self._disk:
            self._spill(h, slot)
        return slot

    def _spill(self, block_hash: bytes, slot: int) -> None:
        if self._disk_add(block_hash):  # else the disk has no room for it: the entry is dropped
            self._transfers.append(KVTransfer("spill", slot=slot, block_hash=block_hash))

    def _disk_add(self, block_hash: bytes) -> bool:
        """Index `block_hash` as a disk entry, deleting the oldest entries past the byte bound (never
        one being read); False when it does not fit."""
        if block_hash in self._disk:
            self._disk.move_to_end(block_hash)
            return True
        if self.disk_entry_bytes > self.disk_limit:
            return False
        while self.disk_bytes + self.disk_entry_bytes > self.disk_limit:
            old = next((h for h in self._disk if h not in self._reading), None)
            if old is None:
                return False
            del self._disk[old]
            self._transfers.append(KVTransfer("delete", block_hash=old))
        self._disk[block_hash] = None
        return True

    # ---- the device pool's side -------------------------------------------------------------
    def on_evict(self, block: int, block_hash: bytes) -> None:
        """Cached device `block` is about to be reused: save its content below."""
        if block_hash in self._host:
            self._host.move_to_end(block_hash)
            return
        if block_hash in self._reading or (not self.host_tier and block_hash in self._disk):
            return
        slot = self._take_slot()
        if slot is None:
            return
        if self.host_tier:
            self._transfers.append(KVTransfer("save", block=block, slot=slot))
            self._host[block_hash] = slot
        else:  # staging only: straight on to disk, the slot is free again
            if self._disk_add(block_hash):
                self._transfers.append(KVTransfer("save", block=block, slot=slot))
                self._transfers.append(KVTransfer("spill", slot=slot, block_hash=block_hash))
            self._free.append(slot)

    def available(self, hashes: list[bytes]) -> int:
        """How many leading `hashes` the host pool can load now; their slots stay pinned until
        `load` takes each (or the step's transfers are taken)."""
        n = 0
        for h in hashes:
            if h not in self._host:
                break
            self._host.move_to_end(h)
            self._pinned.add(self._host[h])
            n += 1
        return n

    def fetch(self, hashes: list[bytes]) -> bool:
        """Start reading the disk entries among the leading `hashes` into host slots (as many as
        slots can be had without evicting an entry of this chain) and say whether any of them is
        being read now. Called after the loads of the host entries before them were recorded, so
        those entries' slots may be reused: their loads come first."""
        keep = {self._host[h] for h in hashes if h in self._host}
        pending = False
        for h in hashes:
            if h in self._reading:
                pending = True
                continue
            if h in self._host:
                self._host.move_to_end(h)
                continue
            if h not in self._disk:
                break
            slot = self._take_slot(keep)
            if slot is None:
                break  # no room to stage more now
            self._reading[h] = slot
            keep.add(slot)
            self._disk.move_to_end(h)
            self._transfers.append(KVTransfer("read", slot=slot, block_hash=h))
            pending = True
        return pending

    def load(self, block_hash: bytes, block: int) -> None:
        slot = self._host[block_hash]
        self._pinned.discard(slot)
        self._host.move_to_end(block_hash)
        self._transfers.append(KVTransfer("load", block=block, slot=slot))
        tier = "disk" if block_hash in self._from_disk else "host"
        self._from_disk.discard(block_hash)
        self.hits[tier] += 1

    def take_meta(self) -> KVConnectorMeta:
        transfers, self._transfers = self._transfers, []
        self._pinned.clear()
        return KVConnectorMeta(transfers)

    # ---- the worker's report ----------------------------------------------------------------
    def update(self, output: KVConnectorOutput) -> None:
        for h, slot, ok in output.finished_reads:
            if self._reading.pop(h, None) is None:
                continue
            if ok:
                self._host[h] = slot
                self._from_disk.add(h)
            else:
                self.num_corrupt += 1
                self._disk.pop(h, None)
                self._free.append(slot)
        for h in output.lost:
            self.num_lost += 1
            self._disk.pop(h, None)

    def check_invariants(self) -> None:
        """For tests: every slot is free, a host entry's or a read's, exactly once."""
        slots = list(self._free) + list(self._host.values()) + list(self._reading.values())
        assert sorted(slots) == list(range(self.num_slots)), "host slots lost or doubly used"
        assert self.disk_bytes <= max(self.disk_limit, 0)
