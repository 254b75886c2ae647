"""edgepc: small, fast, faithful edge models by perception-coherence distillation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgepc")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
