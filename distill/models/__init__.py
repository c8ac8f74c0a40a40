"""Model plugins. Each module registers itself; importing this package loads them all."""

from distill.models import wan  # noqa: F401
