"""factory: a labeled-data factory on Ray (DatasetGAN / DatasetDM as one production system)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("factory")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
