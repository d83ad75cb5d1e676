"""QuaDMix (arXiv 2504.16511): sampling function (Eq. 1-3), Algorithm 1, proxy runs, LightGBM search.

Importing the package registers the ``quadmix`` selector (:mod:`.selector`).
"""
from spokes_lightning.selectors.quadmix.selector import QuaDMixSelector, parameter_search  # noqa: F401
