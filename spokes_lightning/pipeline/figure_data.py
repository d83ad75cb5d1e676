"""Numbers behind the report's paper Figures 3 and 4, computed on the run's own pool.

Fig 3 (paper section 6.1): G-Vendi of the k-subset that each rounding rule makes from the
SPOKES relaxed weights, for a grid of k, beside random k-subsets. With alpha = 0 the relaxed
problem does not depend on k, so one optimization serves every k.
Fig 4 (paper section 6.2): random vs SPOKES under two representations, gradient features and
embeddings, with SPOKES run on each representation and each subset scored in its own.
"""
from __future__ import annotations

import numpy as np

from ..rounding import ROUNDING_RULES, round_weights
from ..spokes import run_spokes
from ..vendi import UnitRows, vendi_score


def _quiet(msg: str) -> None:
    pass


def rounding_curves(features, spokes_params: dict, seed: int, fractions=(0.05, 0.1, 0.25, 0.5)):
    """(ks, {rule: G-Vendi per k}, random G-Vendi per k) from one relaxed SPOKES solve.

    The last k is the whole pool, where every rule and random coincide (computed once).
    """
    n = features.shape[0]
    params = {key: v for key, v in spokes_params.items() if key in ("steps", "tol", "step_rule", "lr", "eta_scale")}
    relaxed = run_spokes(features, k=1, rounding="topk", seed=seed, log=_quiet, **params)
    log_w = np.log(np.maximum(relaxed.weights, 1e-300))
    rows = UnitRows(features, drop_zero_rows=True)
    ks = sorted({max(2, int(n * f)) for f in fractions if int(n * f) < n})
    everything = vendi_score(np.asarray(features), drop_zero_rows=True)
    curves = {rule: [vendi_score(np.asarray(features[np.sort(round_weights(rule, rows, log_w, k, seed=seed))]))
                     for k in ks] + [everything] for rule in ROUNDING_RULES}
    perm = np.random.default_rng(seed).permutation(n)
    rand = [vendi_score(np.asarray(features[np.sort(perm[:k])])) for k in ks] + [everything]
    return ks + [n], curves, rand


def representation_table(features, embeddings, spokes_indices, spokes_params: dict, seed: int, random_seeds: int = 5):
    """Rows {representation, random (mean of seeds), spokes}: each subset scored in its own space.

    On gradients the SPOKES subset is the run's own ``spokes`` selection; on embeddings SPOKES
    runs again with the same settings and budget.
    """
    params = {key: v for key, v in spokes_params.items() if key not in ("selector", "alpha", "log", "drop_zero_rows")}
    k = len(spokes_indices)
    out = []
    for name, rep in (("gradients", features), ("embeddings", embeddings)):
        rep = np.asarray(rep, dtype=np.float32)
        rng = np.random.default_rng(seed)
        rand = float(np.mean([vendi_score(rep[np.sort(rng.choice(len(rep), k, replace=False))])
                              for _ in range(random_seeds)]))
        chosen = spokes_indices if name == "gradients" else run_spokes(
            rep, k=k, seed=seed, log=_quiet, drop_zero_rows=True, **params).indices
        out.append({"representation": name, "k": int(k), "random": rand, "spokes": vendi_score(rep[np.sort(chosen)])})
    return out
