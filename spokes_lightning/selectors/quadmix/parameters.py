"""QuaDMix parameters theta = (alpha_m, beta_m) per domain, and Algorithm 1 (paper section 3.2).

Per domain ``m``: merging weights ``alpha_m`` (N, one per quality criterion, Eq. 1) and the
sampling parameters ``beta_m = (lambda_m, omega_m, eta_m, epsilon_m)`` (Eq. 3); (N + 4) x M in all.
As a vector (the regressor's features) the domains follow in order, each as
``[alpha_1 .. alpha_N, lambda, omega, eta, epsilon]``.

Algorithm 1, exactly as printed: global weights ``a_n ~ U(0, 1)``, ``a~ = a / sum(a)``; per domain
``b_{n,m} ~ U(0, 1)``, ``alpha_{n,m} = a~_n b_{n,m} / sum_i a~_i b_{i,m}``; ``lambda, omega, eta,
epsilon ~ U(0, 1)`` rescaled to ``lambda~ = 10^(3 lambda)`` in [1, 1000], ``omega~ = 0.1 omega`` in
[0, 0.1], ``eta~ = eta`` in [0, 1], ``epsilon~ = epsilon / 1000`` in [0, 0.001].

Explicit parameters (``params`` of the selector, a JSON object or a path to a ``.json`` file)::

    {"criteria": ["dclm_labels", "heuristic_length"],          # optional: default the selector's criteria
     "domains": {"C4": {"alpha": [0.7, 0.3], "lambda": 30, "omega": 0.05, "eta": 0.5, "epsilon": 0.0005},
                 "*":  {...}}}                                   # "*": every domain not listed

``alpha`` may also be ``{criterion: weight}``, and may be left out (equal weights). Weights must be
>= 0 with a positive sum (they are used as given, not renormalised).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spokes_lightning.utils.errors import UserError

BETA = ("lambda", "omega", "eta", "epsilon")


@dataclass
class QuaDMixParams:
    criteria: list[str]
    domains: list[str]
    alpha: np.ndarray  # M x N
    lam: np.ndarray  # M
    omega: np.ndarray
    eta: np.ndarray
    eps: np.ndarray

    @property
    def width(self) -> int:
        return len(self.criteria) + len(BETA)

    def vector(self) -> np.ndarray:
        return np.concatenate([self.alpha, np.stack([self.lam, self.omega, self.eta, self.eps], 1)], 1).reshape(-1)

    @classmethod
    def from_vector(cls, vector, criteria: list[str], domains: list[str]) -> "QuaDMixParams":
        n = len(criteria)
        block = np.asarray(vector, dtype=np.float64).reshape(len(domains), n + len(BETA))
        return cls(list(criteria), list(domains), block[:, :n].copy(), *(block[:, n + j].copy() for j in range(4)))

    def to_dict(self) -> dict:
        return {"criteria": list(self.criteria), "domains": {
            d: {"alpha": [float(a) for a in self.alpha[m]], "lambda": float(self.lam[m]),
                "omega": float(self.omega[m]), "eta": float(self.eta[m]), "epsilon": float(self.eps[m])}
            for m, d in enumerate(self.domains)}}


def parameter_vectors(count: int, n_criteria: int, n_domains: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` draws of Algorithm 1 as rows of the vector layout (count x M (N + 4))."""
    a = rng.random((count, 1, n_criteria))
    a_t = a / a.sum(-1, keepdims=True)
    b = rng.random((count, n_domains, n_criteria))
    alpha = a_t * b / (a_t * b).sum(-1, keepdims=True)
    lam, omega, eta, eps = rng.random((4, count, n_domains, 1))
    beta = np.concatenate([10.0 ** (3.0 * lam), 0.1 * omega, eta, eps / 1000.0], -1)
    return np.concatenate([alpha, beta], -1).reshape(count, -1)


def sample_parameters(criteria: list[str], domains: list[str], rng: np.random.Generator) -> QuaDMixParams:
    """One draw of Algorithm 1."""
    return QuaDMixParams.from_vector(parameter_vectors(1, len(criteria), len(domains), rng)[0], criteria, domains)


def _number(where: str, value, low: float, high: float = np.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) \
            or not low <= value <= high:
        bound = f"in [{low:g}, {high:g}]" if np.isfinite(high) else f">= {low:g}"
        raise UserError(f"quadmix: {where} must be a number {bound}, got {value!r}")
    return float(value)


def load_params(spec, available: list[str], domain_names: list[str]) -> QuaDMixParams:
    """Explicit parameters (dict, JSON text or .json path; see the module doc) in pool domain order."""
    if isinstance(spec, QuaDMixParams):
        spec = spec.to_dict()
    if isinstance(spec, str):
        text = spec
        if not spec.lstrip().startswith("{"):
            try:
                text = Path(spec).read_text()
            except OSError as exc:
                raise UserError(f"quadmix: cannot read params file {spec}: {exc.strerror or exc}") from None
        try:
            spec = json.loads(text)
        except ValueError as exc:
            raise UserError(f"quadmix: params are not valid JSON: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("domains"), dict) or set(spec) - {"criteria", "domains"}:
        raise UserError("quadmix: params must be {\"criteria\": [...], \"domains\": {NAME or \"*\": "
                        "{alpha, lambda, omega, eta, epsilon}}}")
    criteria = spec.get("criteria") or list(available)
    if not isinstance(criteria, list) or not all(isinstance(c, str) for c in criteria) or len(set(criteria)) != len(criteria):
        raise UserError(f"quadmix: params criteria must be a list of distinct names, got {criteria!r}")
    missing = [c for c in criteria if c not in available]
    if missing:
        raise UserError(f"quadmix: params name quality score(s) {', '.join(missing)} that the pool lacks; "
                        f"available: {', '.join(sorted(available)) or '(none)'}")
    given = spec["domains"]
    absent = [d for d in domain_names if d not in given and "*" not in given]
    if absent:
        raise UserError(f"quadmix: params give no values for domain(s) {', '.join(absent[:5])}"
                        f"{' ...' if len(absent) > 5 else ''}; add them or a \"*\" entry")
    n, rows = len(criteria), []
    for d in domain_names:
        entry = given.get(d, given.get("*"))
        where = f"params domain {d!r}"
        if not isinstance(entry, dict) or set(entry) - {"alpha", *BETA} or set(BETA) - set(entry):
            raise UserError(f"quadmix: {where} needs lambda, omega, eta, epsilon (and optionally alpha)")
        alpha = entry.get("alpha", [1.0 / n] * n)
        if isinstance(alpha, dict):
            if set(alpha) - set(criteria):
                raise UserError(f"quadmix: {where} alpha names unknown criteria {sorted(set(alpha) - set(criteria))}")
            alpha = [alpha.get(c, 0.0) for c in criteria]
        if not isinstance(alpha, list) or len(alpha) != n:
            raise UserError(f"quadmix: {where} alpha must list {n} weights ({', '.join(criteria)})")
        alpha = [_number(f"{where} alpha", a, 0.0) for a in alpha]
        if not sum(alpha) > 0:
            raise UserError(f"quadmix: {where} alpha must have a positive sum")
        beta = [_number(f"{where} lambda", entry["lambda"], 0.0), _number(f"{where} omega", entry["omega"], 0.0, 1.0),
                _number(f"{where} eta", entry["eta"], 0.0), _number(f"{where} epsilon", entry["epsilon"], 0.0)]
        rows.append(alpha + beta)
    return QuaDMixParams.from_vector(np.array(rows).reshape(-1), criteria, list(domain_names))
