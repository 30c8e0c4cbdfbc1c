"""Localise a parity failure to the first PyTorch module whose output breaks the policy.

The comparing, the boundary discovery, the quantization-vs-kernel split and the report are
qcrun's (``qcrun.localize``, ``qcrun.boundaries``: the device runs them too); this package adds
what needs torch: the host entry points (:mod:`.run`, with the eager reference of
:mod:`qcexport.hooks`) and the reproducible weight perturbation used by tests and the
acceptance run (:mod:`.perturb`).
"""
