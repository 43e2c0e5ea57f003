"""Measuring tools, beside the product: the load generator (`jetinfer bench`), the model alone through
the worker's backend (`jetinfer engine-bench`) and the bare nats-py loop the worker is compared with.

The scripts in this folder (cpu.sh, gpu/run.sh, video_bench.py, ...) drive them for the figures in
docs/benchmarks.md. Installed as `jetinfer.bench`; nothing in the product imports it.
"""

__all__: list[str] = []
