"""The attributor: :class:`HyperINF` (hyperinf.py) with its configuration (config.py), fitting pass
(fitting.py), scoring (scoring.py), gradient cache (cache.py), score sinks (sinks.py), top-K (topk.py),
and the saved state and fit checkpoints seen from the attributor (stored.py; the file formats are
hyperinf_ext/persistence/)."""
from .config import SIGN_CONVENTION, HyperINFConfig
from .hyperinf import HyperINF

__all__ = ["HyperINF", "HyperINFConfig", "SIGN_CONVENTION"]
