"""Expert tensors in host memory: an LRU bounded by bytes, so a merge never re-reads a cached
expert from disk and memory stays bounded however large the library is."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from ttmm_vllm.library.adapter_io import ExpertWeights
from ttmm_vllm.library.format import LibraryError
from ttmm_vllm.library.store import Library


class ExpertCache:
    """Thread-safe LRU of `ExpertWeights`, bounded by `max_bytes` (at least one expert stays).

    Reads go through `Library.read_expert` (safetensors), checksum-verified the first time an
    expert is read, so a file corrupted after start is refused, never served. An expert read
    again after eviction is not hashed again: hashing costs more than reading it (about 2 ms
    per MB), and admission reads experts on demand.

    Shared-A libraries (`LoraSpec.shared_a`): an expert's first read is whole, and its A's are
    checked against the library's (the first expert read sets them; a different A is refused,
    naming the expert and module) and replaced by that one shared tensor per module. A re-read
    after eviction then reads only the B's: half the bytes, and the LRU counts only B's, so it
    holds twice the experts.
    """

    def __init__(self, library: Library, max_bytes: int = 2 << 30, verify_checksums: bool = True):
        self.library = library
        self.max_bytes = int(max_bytes)
        self.verify = verify_checksums
        self._lru: OrderedDict[int, ExpertWeights] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._verified: set[int] = set()
        self._shared_a: dict[str, object] | None = {} if library.manifest.lora.shared_a \
            else None
        self._a_checked: set[int] = set()  # shared-A experts whose A's matched the library's
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
        if self._shared_a is not None and expert_id in self._a_checked and not verify:
            w = self.library.read_expert(expert_id, shared_a=self._shared_a)
        else:
            w = self.library.read_expert(expert_id, verify_checksum=verify)
            if self._shared_a is not None:
                w = self._adopt_shared_a(w)
        with self._lock:
            self.misses += 1
            if verify:
                self._verified.add(expert_id)
            if expert_id not in self._lru:
                self._lru[expert_id] = w
                self._bytes += self._size(w)
            while self._bytes > self.max_bytes and len(self._lru) > 1:
                _, old = self._lru.popitem(last=False)
                self._bytes -= self._size(old)
        return w

    def _size(self, w: ExpertWeights) -> int:
        """Bytes an expert holds alone (a shared-A expert's A's belong to the library)."""
        if self._shared_a is None:
            return w.nbytes
        return sum(b.numel() * b.element_size() for _, b in w.modules.values())

    def _adopt_shared_a(self, w: ExpertWeights) -> ExpertWeights:
        """Check a whole-read expert's A's against the library's and use the library's."""
        import torch

        with self._lock:
            table = self._shared_a
            for name, (a, _) in w.modules.items():
                ref = table.setdefault(name, a)
                if ref is not a and not torch.equal(ref, a):
                    raise LibraryError(
                        f"expert {w.expert_id}: module {name} has a different A than the "
                        "library's other experts, but the library says they share one "
                        "(lora.shared_a)")
            modules = {name: (table[name], b) for name, (_, b) in w.modules.items()}
            self._a_checked.add(w.expert_id)
        return ExpertWeights(w.expert_id, modules, w.scaling, w.rank)

    def get_many(self, expert_ids: Sequence[int]) -> list[ExpertWeights]:
        return [self.get(i) for i in expert_ids]

    def drop(self, expert_id: int) -> None:
        """Forget an expert (removed from the library, or replaced on disk)."""
        with self._lock:
            self._verified.discard(expert_id)
            self._a_checked.discard(expert_id)
            w = self._lru.pop(expert_id, None)
            if w is not None:
                self._bytes -= self._size(w)
