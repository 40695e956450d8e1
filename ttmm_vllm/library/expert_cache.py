"""Expert tensors in host memory: an LRU bounded by bytes, so a merge never re-reads a cached
expert from disk and memory stays bounded however large the library is."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from ttmm_vllm.library.adapter_io import ExpertWeights
from ttmm_vllm.library.store import Library


class ExpertCache:
    """Thread-safe LRU of `ExpertWeights`, bounded by `max_bytes` (at least one expert stays).

    Reads go through `Library.read_expert` (safetensors), checksum-verified the first time an
    expert is read, so a file corrupted after start is refused, never served. An expert read
    again after eviction is not hashed again: hashing costs more than reading it (about 2 ms
    per MB), and admission reads experts on demand.
    """

    def __init__(self, library: Library, max_bytes: int = 2 << 30, verify_checksums: bool = True):
        self.library = library
        self.max_bytes = int(max_bytes)
        self.verify = verify_checksums
        self._lru: OrderedDict[int, ExpertWeights] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._verified: set[int] = set()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, expert_id: int) -> ExpertWeights:
        with self._lock:
            w = self._lru.get(expert_id)
            if w is not None:
                self._lru.move_to_end(expert_id)
                self.hits += 1
                return w
        verify = self.verify and expert_id not in self._verified
        w = self.library.read_expert(expert_id, verify_checksum=verify)
        with self._lock:
            self.misses += 1
            if verify:
                self._verified.add(expert_id)
            if expert_id not in self._lru:
                self._lru[expert_id] = w
                self._bytes += w.nbytes
            while self._bytes > self.max_bytes and len(self._lru) > 1:
                _, old = self._lru.popitem(last=False)
                self._bytes -= old.nbytes
        return w

    def get_many(self, expert_ids: Sequence[int]) -> list[ExpertWeights]:
        return [self.get(i) for i in expert_ids]

    def drop(self, expert_id: int) -> None:
        """Forget an expert (removed from the library, or replaced on disk)."""
        with self._lock:
            self._verified.discard(expert_id)
            w = self._lru.pop(expert_id, None)
            if w is not None:
                self._bytes -= w.nbytes
