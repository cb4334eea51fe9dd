"""GPU benchmarks and checks, beside the service. Each script runs as a module from the
repository root, e.g. `python -m bench.benchmark --parts gen --out results/`."""
