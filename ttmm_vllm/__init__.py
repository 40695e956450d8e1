"""ttmm-vllm: Test-Time Model Merging served on vLLM.

request -> embed -> route -> merge -> engine -> response. See ARCHITECTURE in the README.
"""

__version__ = "0.1.0"
