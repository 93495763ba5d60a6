"""Triton kernels of hyperinf-ext (installed as ``hyperinf_ext.kernels``).

One file per kernel family (``gfim.py``, ``schulz.py``) with its launcher; ``launchers.py`` is the
backend entry point used by ``hyperinf_ext.backends``.  Importing needs triton.
"""
