"""Bridges to other frameworks; each submodule imports its framework, so import the one you use.

* :mod:`hyperinf_ext.integrations.dattri` — ``IFAttributorHyperINF``, a dattri attributor running
  HyperINF's curvature on LoRA layers (``pip install 'hyperinf-ext[dattri]'``).
* :mod:`hyperinf_ext.integrations.transformers` — ``HyperINFCallback``, fits and saves HyperINF factors
  from a Hugging Face ``Trainer`` / TRL ``SFTTrainer`` run.
"""
