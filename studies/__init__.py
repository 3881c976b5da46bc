"""Studies beyond the design card: evaluations, ablations and benchmarks. Run as `python -m studies.<name>`."""
