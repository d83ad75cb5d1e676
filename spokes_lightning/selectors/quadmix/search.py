"""QuaDMix parameter search (paper section 3.3): proxy losses -> LightGBM -> best predicted theta.

1. ``proxy_runs`` parameter sets from Algorithm 1, each scored by ``evaluate`` (a proxy's
   validation loss; any function of the parameter vector in tests);
2. a LightGBM regressor ``R(theta) -> loss`` fitted on them;
3. ``candidates`` (100,000) fresh Algorithm 1 samples (not a search of the whole box: the paper
   keeps to the sampler's region so the regressor is not asked about outliers), sorted by predicted
   loss; the output is the mean of the ``top`` (10) best parameter vectors, averaged as they are
   (each domain's alpha stays on the simplex; lambda is averaged on its own scale, not its log).

Regressor defaults (the paper gives none): 300 trees, learning rate 0.05, 15 leaves, at least
``max(2, min(20, runs // 10))`` samples per leaf (LightGBM's 20 would fit a constant to a handful
of proxies), deterministic, one thread; ``regressor`` overrides any LightGBM keyword.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from spokes_lightning.utils.errors import UserError
from spokes_lightning.selectors.quadmix.parameters import parameter_vectors

DEFAULT_CANDIDATES = 100_000
DEFAULT_TOP = 10


def regressor_settings(n_runs: int, seed: int, overrides: dict | None = None) -> dict:
    settings = {"n_estimators": 300, "learning_rate": 0.05, "num_leaves": 15,
                "min_child_samples": max(2, min(20, n_runs // 10)), "min_data_in_bin": 1,
                "deterministic": True, "force_row_wise": True, "n_jobs": 1, "random_state": int(seed),
                "verbose": -1}
    settings.update(overrides or {})
    return settings


def fit_regressor(x: np.ndarray, y: np.ndarray, seed: int = 0, overrides: dict | None = None):
    import lightgbm

    if len(y) < 2:
        raise UserError(f"quadmix: the regressor needs at least 2 proxy runs, got {len(y)}")
    model = lightgbm.LGBMRegressor(**regressor_settings(len(y), seed, overrides))
    model.fit(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    return model


def best_predicted(model, n_criteria: int, n_domains: int, candidates: int, top: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean of the ``top`` candidates by predicted loss, their vectors, their predictions)."""
    if not 1 <= top <= candidates:
        raise UserError(f"quadmix: search_top must be in [1, search_candidates], got {top} of {candidates}")
    pool = parameter_vectors(candidates, n_criteria, n_domains, rng)
    predicted = model.predict(pool)
    best = np.argsort(predicted, kind="stable")[:top]
    return pool[best].mean(0), pool[best], predicted[best]


def search(evaluate: Callable[[np.ndarray], float], n_criteria: int, n_domains: int, *, runs: int,
           candidates: int = DEFAULT_CANDIDATES, top: int = DEFAULT_TOP, seed: int = 0,
           regressor: dict | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Section 3.2-3.3 end to end; ``evaluate(vector) -> loss`` (smaller = better)."""
    thetas = parameter_vectors(runs, n_criteria, n_domains, np.random.default_rng([int(seed), 0x5A]))
    losses = []
    for i, theta in enumerate(thetas):
        losses.append(float(evaluate(theta)))
        if log is not None:
            log(f"quadmix: proxy {i + 1}/{runs}: loss {losses[-1]:.4f}")
    losses = np.array(losses)
    model = fit_regressor(thetas, losses, seed, regressor)
    fitted = model.predict(thetas)
    theta, best, predicted = best_predicted(model, n_criteria, n_domains, candidates, top,
                                            np.random.default_rng([int(seed), 0xC4]))
    return {"theta": theta, "proxy_thetas": thetas, "proxy_losses": losses, "top_thetas": best,
            "top_predicted": predicted, "predicted_at_theta": float(model.predict(theta[None])[0]),
            "train_mae": float(np.mean(np.abs(fitted - losses))), "regressor": model}
