"""Reading and writing fitted factors, fit checkpoints and score files (safetensors + JSON).

A factor directory (``HyperINF.save``) and a fit's ``checkpoint_dir`` share one layout::

    meta.json                        the manifest: format, configuration, counts, per-layer (r, d),
                                     the data fingerprint and the name of the factors file
    factors-<generation>.safetensors per-layer GFIM sums Σ g_iᵀg_i [d, d], rank-side sums [r, r] and,
                                     from ``save``, the method's inverses [d, d]
    grads/                           (checkpoints) the disk gradient cache, see cache.py
    lock                             (checkpoints) flock-ed by the fit using the directory
    .write.lock                      flock-ed while a commit writes (a second writer is refused)

A commit writes a complete factors file under a fresh generation name, then replaces ``meta.json``
(which names it) with one ``os.replace``: a reader sees the previous commit or the new one, never
factors of one and counts of the other.  Every file is written to a temporary name, fsync-ed and
renamed.  Everything read back is checked (JSON structure, tensor names, shapes against the model,
finiteness) and a problem raises ``ValueError`` naming the file.

Every artefact directory names its kind in ``meta.json`` (``"kind"``: factors, checkpoint, score store);
kinds.py tells them apart (also older manifests without the key) and every writer and loader checks it.

Modules: kinds.py (what a directory holds; the check every writer and loader makes), files.py (atomic
writes, checked reads, the ``crash_point`` test hook), state.py (the committed
state: read with every check, written as a new generation; score files), checkpoint.py (locked fit
checkpoints), fingerprints.py (of the model and of the data).  These take factors, configuration values
and the model — never the attributor, which sits above (hyperinf_ext/attributor/stored.py installs a
state into it).
"""
from ..errors import CheckpointBusyError, DirectoryBusyError
from . import kinds
from .checkpoint import LOCK, Checkpoint
from .files import (CRASH_ENV, WRITE_LOCK, crash_point, file_sha256, hold_lock, read_json, read_tensors, save_tensors_atomic,
                    write_bytes_atomic, writing)
from .fingerprints import DataFingerprint, adapter_fingerprint, base_fingerprint, full_values, model_fingerprint
from .state import (FORMAT_VERSION, META, StoredState, check_adapter, check_layers, load_scores, read_state,
                    save_scores, stored_factors, write_state)

__all__ = [
    "CRASH_ENV", "FORMAT_VERSION", "LOCK", "META", "Checkpoint", "CheckpointBusyError", "DataFingerprint", "DirectoryBusyError",
    "WRITE_LOCK", "hold_lock", "writing",
    "StoredState", "adapter_fingerprint", "full_values", "base_fingerprint", "check_adapter", "check_layers", "crash_point", "file_sha256", "load_scores",
    "model_fingerprint", "read_json", "read_state", "read_tensors", "save_scores", "save_tensors_atomic", "stored_factors", "write_bytes_atomic",
    "kinds", "write_state",
]
