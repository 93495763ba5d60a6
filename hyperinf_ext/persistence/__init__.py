"""Reading and writing fitted factors, fit checkpoints and score files (safetensors + JSON).

A factor directory (``HyperINF.save``) and a fit's ``checkpoint_dir`` share one layout::

    meta.json                        the manifest: format, configuration, counts, per-layer (r, d),
                                     the data fingerprint and the name of the factors file
    factors-<generation>.safetensors per-layer GFIM sums Σ g_iᵀg_i [d, d], rank-side sums [r, r] and,
                                     from ``save``, the method's inverses [d, d]
    grads/                           (checkpoints) the disk gradient cache, see cache.py
    lock                             (checkpoints) flock-ed by the fit using the directory

A commit writes a complete factors file under a fresh generation name, then replaces ``meta.json``
(which names it) with one ``os.replace``: a reader sees the previous commit or the new one, never
factors of one and counts of the other.  Every file is written to a temporary name, fsync-ed and
renamed.  Everything read back is checked (JSON structure, tensor names, shapes against the model,
finiteness) and a problem raises ``ValueError`` naming the file.

Modules: files.py (atomic writes, checked reads, the ``crash_point`` test hook), state.py (the committed
state, save/load, score files), checkpoint.py (locked fit checkpoints and data/model fingerprints).
"""
from ..errors import CheckpointBusyError
from .checkpoint import LOCK, Checkpoint, DataFingerprint, model_fingerprint
from .files import (CRASH_ENV, crash_point, read_json, read_tensors, save_tensors_atomic,
                    write_bytes_atomic)
from .state import (FORMAT_VERSION, META, StoredState, apply_state, check_layers, load, load_scores,
                    prepare_from_stored, read_state, save, save_scores, write_state)

__all__ = [
    "CRASH_ENV", "FORMAT_VERSION", "LOCK", "META", "Checkpoint", "CheckpointBusyError", "DataFingerprint",
    "StoredState", "apply_state", "check_layers", "crash_point", "load", "load_scores", "model_fingerprint",
    "prepare_from_stored", "read_json", "read_state", "read_tensors", "save", "save_scores",
    "save_tensors_atomic", "write_bytes_atomic", "write_state",
]
