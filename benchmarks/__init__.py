"""Benchmarks: does TTMM improve the model (quality), what does it cost per request (overhead),
and how fast does it serve (throughput). Each is one command that writes JSON (with its
config), a markdown table and PNG plots into a results folder; `run_all --smoke` runs them all
on a tiny model in a few minutes. See benchmarks/README.md.

They drive the product through its public faces only: the gRPC client against an in-process
server (`common.serve`), or the engine; the reference rows (multitask, ensembling, TTT) run on
transformers + PEFT via `training/` helpers.
"""
