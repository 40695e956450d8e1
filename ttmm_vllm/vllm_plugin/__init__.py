"""ttmm's vLLM plugin (entry point `vllm.general_plugins: ttmm`): runs in every vLLM process.

What it changes in vLLM, each by a narrow patch installed by `register()` (no fork, no edit
of site-packages):

1. `CpuPlatform.get_punica_wrapper` -> `punica.TTMMPunicaWrapperCPU` (unless the engine's
   `PluginConfig.enabled` is False). Why: vLLM picks the CPU LoRA kernels only through this
   method, and its stock ops cost O(tokens x max_lora_rank) even for tokens with no adapter.
2. `WorkerLoRAManager._load_adapter`: a request whose name carries a routing
   (`protocol.py`) is built from the worker's resident experts (`worker_merge.py`) instead of
   read from `lora_path`; any other adapter loads as before, and its real rank is noted for
   the grouped op. Why: vLLM can only build adapters from a path, and TTMM needs one merged
   adapter per request at no file cost.
3. `WorkerLoRAManager.create_lora_manager` and its LRU subclass's: read the plugin's config
   from the `VllmConfig` the worker got, remember vLLM's LoRA model manager (the layers the
   expert banks are stacked for) and preload `PluginConfig.library`. Why: it is the one moment
   in the worker when both the config and the LoRA layers exist.

Configuration and the engine's side of the contract: `config.py`. Re-routing a live adapter:
`config.reroute` -> `worker.TTMMWorkerExtension.ttmm_set_routing`.
"""

from __future__ import annotations

import functools

_installed = False


def register() -> None:
    """vLLM's general-plugin hook: install the patches once per process."""
    global _installed
    if _installed:
        return
    _patch_punica_selection()
    _patch_worker_lora_manager()
    _installed = True


def _patch_punica_selection() -> None:
    try:
        from vllm.platforms.cpu import CpuPlatform
    except Exception:  # a vLLM build without the CPU platform: nothing to replace
        return
    stock = CpuPlatform.get_punica_wrapper

    def get_punica_wrapper(cls) -> str:
        from ttmm_vllm.vllm_plugin.state import STATE

        if not STATE.configured:  # e.g. a model manager built outside the worker manager
            from vllm.config import get_current_vllm_config_or_none

            from ttmm_vllm.vllm_plugin.config import PluginConfig

            STATE.configure(PluginConfig.from_vllm_config(get_current_vllm_config_or_none()))
        if STATE.config.enabled:
            return "ttmm_vllm.vllm_plugin.punica.TTMMPunicaWrapperCPU"
        STATE.mix_ops_active = False
        return stock()

    get_punica_wrapper.__doc__ = f"ttmm: the plugin's wrapper unless disabled.\n{stock.__doc__}"
    CpuPlatform.get_punica_wrapper = classmethod(get_punica_wrapper)


def _patch_worker_lora_manager() -> None:
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager, WorkerLoRAManager

    stock_load = WorkerLoRAManager._load_adapter

    @functools.wraps(stock_load)
    def _load_adapter(self, lora_request):
        from ttmm_vllm.vllm_plugin.protocol import parse_routing_lora_name
        from ttmm_vllm.vllm_plugin.state import STATE, adapter_rank

        _maybe_prune(self, STATE)
        spec = parse_routing_lora_name(lora_request.lora_name)
        if spec is None:  # an ordinary adapter: vLLM's own loading, untouched
            lora = stock_load(self, lora_request)
            STATE.note_ordinary(lora.id, adapter_rank(lora))
            return lora
        # Only routing adapters import the in-worker merge (and the vLLM internals it
        # builds LoRAModels with): ordinary `vllm serve --enable-lora` never does.
        from ttmm_vllm.vllm_plugin.worker_merge import load_routing_adapter

        return load_routing_adapter(self, lora_request, spec, STATE)

    WorkerLoRAManager._load_adapter = _load_adapter

    stock_remove = WorkerLoRAManager.remove_adapter

    @functools.wraps(stock_remove)
    def remove_adapter(self, adapter_id):
        from ttmm_vllm.vllm_plugin.state import STATE

        # the server retired this adapter: its routing (and the expert bank a "mix" routing
        # holds) goes with it, not at the next prune
        STATE.forget(int(adapter_id))
        return stock_remove(self, adapter_id)

    WorkerLoRAManager.remove_adapter = remove_adapter

    for cls in (WorkerLoRAManager, LRUCacheWorkerLoRAManager):
        _wrap_create_lora_manager(cls)


def _wrap_create_lora_manager(cls) -> None:
    stock = cls.__dict__["create_lora_manager"]

    @functools.wraps(stock)
    def create_lora_manager(self, model, vllm_config):
        from ttmm_vllm.vllm_plugin.config import PluginConfig
        from ttmm_vllm.vllm_plugin.state import STATE

        STATE.configure(PluginConfig.from_vllm_config(vllm_config))
        out = stock(self, model, vllm_config)
        STATE.attach_manager(self._adapter_manager)
        if STATE.config.library and STATE.config.worker_merge == "mix":
            STATE.bank(STATE.config.library)  # "expand" reads experts on demand instead
        return out

    cls.create_lora_manager = create_lora_manager


def _maybe_prune(worker_manager, state) -> None:
    """Keep the routing/rank tables bounded by what vLLM still holds."""
    capacity = worker_manager.lora_config.max_cpu_loras or worker_manager.lora_config.max_loras
    if len(state.routes) + len(state.ranks) > 2 * capacity + 16:
        state.prune(set(worker_manager.list_adapters()))
