"""One request of a soak's mix, shared by the soak tests: request `i` of a round is completed,
a stream cancelled after its first chunk, past its deadline, or (with `invalid`) refused as
INVALID_ARGUMENT; the kind it ended as is returned."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import pytest

from ttmm_vllm.client import TTMMClient


def mixed_request(c: TTMMClient, i: int, prompts: Sequence[str], *, invalid: bool = False,
                  max_tokens: int = 16) -> str:
    kind = i % (4 if invalid else 3)
    kw = dict(max_tokens=max_tokens, beta=0.05 + 0.05 * (i % 5), max_active=1 + i % 3)
    p = prompts[i % len(prompts)] + " the" * (i % 3)
    if kind == 0:
        c.generate(p, timeout=120, **kw)
        return "completed"
    if kind == 1:
        s = c.stream(p, **{**kw, "max_tokens": 200})
        next(s)
        s.cancel()
        return "cancelled"
    if kind == 2:
        try:
            c.generate(p, timeout=0.05, **{**kw, "max_tokens": 200})
            return "completed"
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            return "deadline"
    with pytest.raises(grpc.RpcError) as e:
        c.generate(p, timeout=30, **{**kw, "beta": -1.0})
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return "invalid"
