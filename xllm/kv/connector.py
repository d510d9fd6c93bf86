"""KV connectors: KV data that moves between the device cache and somewhere else.

A connector has two sides, so that the scheduler never does I/O and the copies run where the KV
cache lives (today the same process; with worker ranks, each worker):

- the **scheduler side** (`KVConnectorScheduler`) decides, by block hash, which device blocks
  are saved below and which are loaded back, and writes those decisions as plain values into
  the step's `KVConnectorMeta` (it rides in `SchedulerOutput.kv_meta`);
- the **worker side** (`KVConnectorWorker`) carries the step's transfers out before the step's
  forward pass, in order, starts slow I/O in the background, and reports what finished in
  `KVConnectorOutput` (it rides back in `RunnerOutput.kv_output`).

The host/disk tiers under the prefix cache (`kv/tiers/`) are the first connector; prefill/decode
KV transfer and cluster KV events are built on the same two sides.

Ordering: transfers are executed in the order the scheduler side recorded them, before the
forward pass of the step whose schedule carries them. A save therefore reads a block before any
new owner writes it, and a load fills a block before the requests of that step read it; with
pipelining the step before has finished by then, so nothing it still writes can be overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class KVTransfer:
    """One transfer, as the scheduler side decided it.

    kind: "save" (device `block` -> host `slot`), "load" (host `slot` -> device `block`),
    "spill" (host `slot` -> the disk entry of `block_hash`, written in the background),
    "read" (the disk entry of `block_hash` -> host `slot`, in the background; reported when
    done), "delete" (the disk entry of `block_hash`).
    """

    kind: str
    block: int = -1
    slot: int = -1
    block_hash: bytes = b""


@dataclass
class KVConnectorMeta:
    """The transfers of one step (values only: they can cross a process boundary)."""

    transfers: list[KVTransfer] = field(default_factory=list)
    # Nothing else can run this step, and reads are in flight: the worker may wait for one.
    wait_for_reads: bool = False

    def extend(self, other: "KVConnectorMeta") -> None:
        self.transfers += other.transfers
        self.wait_for_reads = self.wait_for_reads or other.wait_for_reads

    def __bool__(self) -> bool:
        return bool(self.transfers) or self.wait_for_reads


@dataclass
class KVConnectorOutput:
    """What the worker side finished since its last report."""

    # (block hash, host slot, whether the entry was whole and ours) for each finished read
    finished_reads: list[tuple[bytes, int, bool]] = field(default_factory=list)
    # disk entries the worker could not write (queue over its byte bound, or an I/O error)
    lost: list[bytes] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.finished_reads or self.lost)


@dataclass(frozen=True)
class PrefixLookup:
    """What a prefix lookup found: device blocks to take as hits, and whether more of the chain is
    still being read in (then the request waits in `WAITING_FOR_KV` while others step)."""

    blocks: list[int]
    pending: bool = False


class KVConnectorScheduler(Protocol):
    def on_evict(self, block: int, block_hash: bytes) -> None:
        """The device pool reuses cached `block`: keep its content (under its hash) below."""

    def available(self, hashes: list[bytes]) -> int:
        """How many leading `hashes` can be loaded now."""

    def load(self, block_hash: bytes, block: int) -> None:
        """Record a load of an available hash into free device block `block`."""

    def fetch(self, hashes: list[bytes]) -> bool:
        """Start bringing the leading `hashes` found on slower storage within reach (they become
        available later); whether any of them is still on its way."""

    def take_meta(self) -> KVConnectorMeta:
        """The transfers recorded since the last call (they join the step being scheduled)."""

    def update(self, output: KVConnectorOutput) -> None:
        """Account for what the worker side finished."""

    @property
    def reads_pending(self) -> bool: ...


class KVConnectorWorker(Protocol):
    def execute(self, meta: KVConnectorMeta) -> None:
        """Carry out a step's transfers, in order, before its forward pass."""

    def take_output(self) -> KVConnectorOutput:
        """What finished since the last call."""
