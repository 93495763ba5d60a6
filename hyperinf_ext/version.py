"""The package version (one home: setup metadata is in pyproject.toml, checked by a test)."""
__version__ = "0.1.0"
