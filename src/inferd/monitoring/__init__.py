"""Data drift and prediction monitoring of the served versions.

``reference.json`` (:mod:`~inferd.monitoring.reference`) says what a version's inputs and
predictions looked like in training; :mod:`~inferd.monitoring.profile` writes one from data;
:class:`Monitor` compares what is served against it over a sliding window
(:mod:`~inferd.monitoring.window`) and exports PSI and class counts. See docs/monitoring.md.
"""

from inferd.monitoring.monitor import Monitor
from inferd.monitoring.profile import build_reference, read_csv
from inferd.monitoring.reference import REFERENCE_FILE, LoadedReference, Reference, load_reference

__all__ = [
    "REFERENCE_FILE",
    "LoadedReference",
    "Monitor",
    "Reference",
    "build_reference",
    "load_reference",
    "read_csv",
]
