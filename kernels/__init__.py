"""Triton kernels, their tile configurations and the ahead-of-time compilation helper.

One file per kernel family (``gfim.py``, ``schulz.py``) with its tile configuration and launch
wrapper; ``aot.py`` compiles every variant for a GPU target without a GPU.  Nothing here imports the
package that installs this directory (setup.py maps it to a subpackage; the top-level name
``kernels`` is taken on PyPI): the host drivers that call these kernels live with the other backends.
Importing needs triton.
"""
