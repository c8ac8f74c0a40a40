"""Training methods. Each module registers itself; importing this package loads them all."""

from distill.methods.distribution_matching import dmd2  # noqa: F401
from distill.methods.fine_tuning import flow_matching  # noqa: F401
