"""kvgate's benchmarks: ``python -m bench <study>`` (``bench.studies``), run from the repository
root. Not installed with kvgate: the product does not depend on it."""
