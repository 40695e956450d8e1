"""vLLM plugin (entry point `vllm.general_plugins: ttmm`): runs in every vLLM process."""


def register() -> None:
    """Placeholder until the fast-LoRA plugin lands."""
