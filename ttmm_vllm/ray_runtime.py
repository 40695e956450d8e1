"""Joining or starting Ray: one place for `ttmm build --ray` and `ttmm serve --ray`.

Ray is an optional extra (`pip install ttmm-vllm[ray]`); it is imported only inside these
functions, so the local paths never need it. The address follows `ray.init`:

- `"local"`: start a Ray on this machine for this process (stopped when it ends);
- `"auto"`: join the cluster this machine belongs to (`ray start --head` / `--address`);
- `"host:port"` or `"ray://host:port"`: join that cluster.

When this process is already connected (a test session, a notebook, a Ray job), that
connection is used as it is and left open: whoever connected owns it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from ttmm_vllm.home import OFFLINE_ENV

log = logging.getLogger(__name__)

LOCAL = "local"

# The settings the CLI runs with; Ray workers on other machines do not inherit this
# process's environment, so they get the same values explicitly.
FORWARDED_ENV = tuple(OFFLINE_ENV)


def forwarded_env() -> dict[str, str]:
    """The environment variables every ttmm task or replica should run with."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def require_ray():
    """Import Ray, or say how to get it."""
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("--ray needs Ray: pip install 'ttmm-vllm[ray]' "
                           "(or pip install 'ray[serve]>=2.40')") from e
    return ray


@contextlib.contextmanager
def ray_runtime(address: str = LOCAL, *, num_cpus: int | None = None,
                object_store_bytes: int | None = None) -> Iterator[None]:
    """Be connected to Ray for the duration of the block.

    `num_cpus` and `object_store_bytes` apply only when a local Ray is started; a cluster
    brings its own resources. A local Ray runs without the dashboard (it is not needed and
    costs memory and a port).
    """
    ray = require_ray()
    if ray.is_initialized():
        log.info("using the Ray runtime this process is already connected to")
        yield
        return
    env = {"env_vars": forwarded_env()}
    if address == LOCAL:
        ray.init(num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=object_store_bytes, runtime_env=env,
                 log_to_driver=True)
        log.info("started a local Ray: %s", ray.cluster_resources())
    else:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        log.info("joined the Ray cluster at %s: %s", address, ray.cluster_resources())
    try:
        yield
    finally:
        ray.shutdown()
