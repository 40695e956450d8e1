"""Fixtures shared by the serving tests: the tiny library opened once, and the offline
reference (transformers + PEFT) that served outputs are checked against."""

from __future__ import annotations

import pytest

from ttmm_vllm.library import Library
from ttmm_vllm.testing import Reference


@pytest.fixture(scope="session")
def library(tiny_library) -> Library:
    return Library.open(tiny_library)


@pytest.fixture(scope="session")
def reference(tiny_model_dir, library) -> Reference:
    """One reference for the session: it caches the PEFT merges it builds."""
    return Reference(tiny_model_dir, library)
