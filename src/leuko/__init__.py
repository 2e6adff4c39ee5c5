"""leuko: white-blood-cell classification by transfer learning.

The public API is organised by concern: :mod:`leuko.data` (datasets, splits,
audits, transforms), :mod:`leuko.models` (registry, heads, weights),
:mod:`leuko.train`, :mod:`leuko.evaluate` and :mod:`leuko.infer`. The ``leuko``
command line is a thin layer over these modules.
"""

from __future__ import annotations

from leuko.errors import LeukoError

__version__ = "0.1.0"

__all__ = ["LeukoError", "__version__"]
