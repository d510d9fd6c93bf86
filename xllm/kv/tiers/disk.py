"""The disk tier's files: one entry per block hash, in a folder that belongs to one instance.

An entry `<hash hex>.kv` is a header (magic, the KV fingerprint of what wrote it, the payload's
sha256 and length) and the block's rows in every layer. It is written to a temporary name and
renamed (a crash leaves no entry under its final name). A read returns the payload only if the
file is whole, its checksum matches, it was written under the same fingerprint and it has the
size a block has here: anything else is a miss, never a crash.

Folders: `--kv-disk-dir ROOT` holds one folder per fingerprint (`ROOT/<fingerprint>`), so a
folder written by another model, dtype, block size, layout or rank is never read. An instance
takes its folder with an exclusive `flock` (released by the kernel when the process dies,
SIGKILL included); a second live instance with the same fingerprint takes `<fingerprint>.1`,
and so on, so no process ever deletes another's files, and a restarted instance finds its old
entries again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger(__name__)

MAGIC = b"XLLMKV02"
HEADER = struct.Struct("<8s16s32sQ")  # magic, fingerprint (16 bytes), sha256 of the payload, payload length
SUFFIX = ".kv"
_MAX_FOLDERS = 64


def entry_bytes(payload_bytes: int) -> int:
    return HEADER.size + payload_bytes


def encode_entry(fingerprint: bytes, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, fingerprint, hashlib.sha256(payload).digest(), len(payload)) + payload


def read_entry(path: str, fingerprint: bytes, payload_bytes: int) -> bytes | None:
    """The payload of the entry at `path` if it is whole, ours and of the expected size, else None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if len(data) != entry_bytes(payload_bytes):
        return None
    magic, fp, digest, length = HEADER.unpack_from(data)
    payload = data[HEADER.size :]
    if magic != MAGIC or fp != fingerprint or length != payload_bytes or hashlib.sha256(payload).digest() != digest:
        return None
    return payload


def claim_folder(root: str, fingerprint_hex: str, description: dict) -> tuple[str, int]:
    """This instance's folder under `root` for `fingerprint_hex`, locked: (path, lock fd)."""
    os.makedirs(root, exist_ok=True)
    for i in range(_MAX_FOLDERS):
        path = os.path.join(root, fingerprint_hex if i == 0 else f"{fingerprint_hex}.{i}")
        os.makedirs(path, exist_ok=True)
        fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # another live instance holds it
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        with open(os.path.join(path, "fingerprint.json"), "w") as f:
            json.dump({"fingerprint": fingerprint_hex, **description}, f, indent=1)
        return path, fd
    raise RuntimeError(f"{root}: {_MAX_FOLDERS} instances already hold a KV disk folder for fingerprint {fingerprint_hex}")


class DiskStore:
    """This instance's disk entries: a writer thread and a reader thread, each in order.

    Writes are queued with their payload (bounded in bytes: past the bound a write is dropped and
    reported lost, since the tier is a cache); a read of an entry whose write is still queued is
    served from the queued payload. Reads are checked (`read_entry`); a damaged one is deleted.
    """

    def __init__(self, root: str, fingerprint: bytes, description: dict, payload_bytes: int, max_queued_bytes: int):
        self.fingerprint = fingerprint
        self.payload_bytes = payload_bytes
        self.folder, self._lock_fd = claim_folder(root, fingerprint.hex(), description)
        self.max_queued_bytes = max_queued_bytes
        self._queued: dict[bytes, bytes] = {}  # hash -> payload waiting to be written
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="xllm-kv-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="xllm-kv-read")
        self.lost: list[bytes] = []  # entries not written (appended by the writer thread)
        self.num_corrupt = 0

    def path(self, block_hash: bytes) -> str:
        return os.path.join(self.folder, block_hash.hex() + SUFFIX)

    def scan(self) -> list[bytes]:
        """The entries already in the folder, oldest first; leftovers of unfinished writes (of
        this folder's earlier owner, which is dead: we hold the lock) are deleted."""
        entries = []
        for name in os.listdir(self.folder):
            full = os.path.join(self.folder, name)
            if name.endswith(".tmp"):
                os.unlink(full)
            elif name.endswith(SUFFIX) and len(name) == 64 + len(SUFFIX):
                try:
                    entries.append((os.stat(full).st_mtime_ns, bytes.fromhex(name[:64])))
                except (OSError, ValueError):
                    continue
        return [h for _, h in sorted(entries)]

    # ---- writes -----------------------------------------------------------------------------
    def write(self, block_hash: bytes, payload: bytes) -> None:
        with self._lock:
            if self._queued_bytes + len(payload) > self.max_queued_bytes:
                self.lost.append(block_hash)
                return
            self._queued[block_hash] = payload
            self._queued_bytes += len(payload)
        self._writer.submit(self._write, block_hash, payload)

    def _write(self, block_hash: bytes, payload: bytes) -> None:
        path = self.path(block_hash)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(encode_entry(self.fingerprint, payload))
            os.replace(tmp, path)  # atomic: whole or absent
        except OSError as exc:
            logger.warning("KV disk tier: could not write %s (%s); the block is dropped", path, exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            with self._lock:
                self.lost.append(block_hash)
        finally:
            with self._lock:
                if self._queued.get(block_hash) is payload:
                    del self._queued[block_hash]
                self._queued_bytes -= len(payload)

    def delete(self, block_hash: bytes) -> None:
        self._writer.submit(self._delete, block_hash)

    def _delete(self, block_hash: bytes) -> None:
        try:
            os.unlink(self.path(block_hash))
        except FileNotFoundError:
            pass

    def take_lost(self) -> list[bytes]:
        with self._lock:
            lost, self.lost = self.lost, []
        return lost

    # ---- reads ------------------------------------------------------------------------------
    def read(self, block_hash: bytes, into, done) -> None:
        """Read and check an entry in the reader thread; `into(payload)` copies it where it goes,
        then `done(ok)` is called (from that thread)."""
        self._reader.submit(self._read, block_hash, into, done)

    def _read(self, block_hash: bytes, into, done) -> None:
        ok = False
        try:
            with self._lock:
                payload = self._queued.get(block_hash)
            if payload is None:
                payload = read_entry(self.path(block_hash), self.fingerprint, self.payload_bytes)
            if payload is None:
                self.num_corrupt += 1
                logger.warning("KV disk entry %s is damaged, foreign or gone; ignored (the block is recomputed)",
                               block_hash.hex())
                self._delete(block_hash)
            else:
                into(payload)
                ok = True
        finally:
            done(ok)

    def flush(self) -> None:
        """Wait for the queued writes and reads (tests, shutdown)."""
        self._writer.submit(lambda: None).result()
        self._reader.submit(lambda: None).result()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        os.close(self._lock_fd)
