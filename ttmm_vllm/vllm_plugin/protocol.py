"""How a request's routing travels to vLLM's worker: inside an ordinary LoRA adapter name.

vLLM carries a `LoRARequest(lora_name, lora_int_id, lora_path)` from the API process to the
worker untouched. A *routing adapter* is such a request whose name encodes the routing (expert
ids and weights, a few bytes) and whose path is the expert library's root. The plugin's patch of
`WorkerLoRAManager._load_adapter` recognises the name and builds the adapter from expert tensors
already resident in the worker: nothing is written or read per request.

    ttmm-route/v1/<strategy>/<tag>/<id>:<weight>,<id>:<weight>,...

- strategy: "mix" (all experts resident, mixed per token by the LoRA op), "expand" (a
  rank-expanded LoRAModel built in memory; works with vLLM's stock ops, also on GPUs) or ""
  (the worker's configured default).
- tag: free text without "/" (e.g. a nonce). Two requests with the same name share vLLM's
  prefix cache, so an adapter whose routing may change during generation (re-routing) must
  carry a tag no other adapter uses.
- weights are written with `repr(float)`, which round-trips exactly: the worker serves the
  very weights the router computed.

Pure Python: importable without vLLM or torch (the API process and tests use it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "ttmm-route/v1/"
STRATEGIES = ("mix", "expand")


class RoutingNameError(ValueError):
    """A name that starts like a routing adapter's but cannot be parsed; says what is wrong."""


@dataclass(frozen=True)
class RoutingSpec:
    """A routing as the worker receives it. weights[i] belongs to expert_ids[i]."""

    expert_ids: tuple[int, ...]
    weights: tuple[float, ...]
    strategy: str = ""  # "" -> the worker's default (PluginConfig.worker_merge)
    tag: str = ""

    def __post_init__(self) -> None:
        if not self.expert_ids:
            raise RoutingNameError("a routing needs at least one expert")
        if len(self.expert_ids) != len(self.weights):
            raise RoutingNameError(
                f"{len(self.expert_ids)} expert ids but {len(self.weights)} weights"
            )
        if len(set(self.expert_ids)) != len(self.expert_ids):
            raise RoutingNameError(f"expert ids repeat: {list(self.expert_ids)}")
        for i in self.expert_ids:
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise RoutingNameError(f"expert id must be an int >= 0, got {i!r}")
        for w in self.weights:
            if not isinstance(w, float) or not math.isfinite(w):
                raise RoutingNameError(f"weight must be a finite float, got {w!r}")
        if self.strategy not in ("", *STRATEGIES):
            raise RoutingNameError(
                f"strategy must be one of {STRATEGIES} or '' (worker default), "
                f"got {self.strategy!r}"
            )
        if "/" in self.tag:
            raise RoutingNameError(f"tag must not contain '/', got {self.tag!r}")


def routing_lora_name(
    expert_ids: Sequence[int],
    weights: Sequence[float],
    *,
    strategy: str = "",
    tag: str = "",
) -> str:
    """The LoRA adapter name that carries this routing (see the module docstring)."""
    spec = RoutingSpec(tuple(int(i) for i in expert_ids), tuple(float(w) for w in weights),
                       strategy, tag)
    pairs = ",".join(f"{i}:{w!r}" for i, w in zip(spec.expert_ids, spec.weights, strict=True))
    return f"{PREFIX}{spec.strategy}/{spec.tag}/{pairs}"


def is_routing_lora_name(name: str) -> bool:
    return name.startswith(PREFIX)


def parse_routing_lora_name(name: str) -> RoutingSpec | None:
    """The routing a name carries; None for an ordinary adapter's name.

    Raises RoutingNameError when the name has the routing prefix but is malformed, so a typo
    never silently falls back to reading a file.
    """
    if not is_routing_lora_name(name):
        return None
    parts = name[len(PREFIX):].split("/")
    if len(parts) != 3:
        raise RoutingNameError(f"routing adapter name {name!r}: expected "
                               f"'{PREFIX}<strategy>/<tag>/<id>:<weight>,...'")
    strategy, tag, pairs = parts
    ids: list[int] = []
    weights: list[float] = []
    for item in pairs.split(","):
        try:
            i, w = item.split(":")
            ids.append(int(i))
            weights.append(float(w))
        except ValueError as e:
            raise RoutingNameError(f"routing adapter name {name!r}: bad pair {item!r}") from e
    return RoutingSpec(tuple(ids), tuple(weights), strategy, tag)
