"""Fit the coefficients of akidb_embed/modeling/models/fast_math.py (run once; prints them).

erf(a) ~ a P(a^2) / Q(a^2) on [0, 4.5] (P, Q of degree 5, Q(0) = 1) and
exp(r) ~ E(r) on [-ln2/2, ln2/2] (degree 6), each by least squares reweighted toward the
largest errors (Lawson), which approaches the minimax fit. Needs numpy and scipy.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf

# erf(4.5) = 1 - 2e-10, and the fitted rational gives exactly 1.0 there in float32, so
# GELU of anything clamped to the limit is exactly relu(x).
ERF_LIMIT = 4.5


def grid(lo: float, hi: float) -> np.ndarray:
    chebyshev = np.cos(np.linspace(0, np.pi, 4000)) * (hi - lo) / 2 + (hi + lo) / 2
    return np.concatenate([chebyshev, np.linspace(lo, hi, 4000)])


def fit_erf(degree: int = 5, iterations: int = 60) -> tuple[np.ndarray, np.ndarray, float]:
    a = grid(0.0, ERF_LIMIT)
    t, y = a * a, erf(a)
    weights, q_prev = np.ones_like(a), np.ones_like(a)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(iterations):
        # Linearised: a P(t) - y (Q(t) - 1) = y, divided by the last Q (Sanathanan-Koerner).
        powers = t[:, None] ** np.arange(degree + 1)
        system = np.concatenate([a[:, None] * powers, -y[:, None] * powers[:, 1:]], axis=1)
        w = weights / np.abs(q_prev)
        solution, *_ = np.linalg.lstsq(system * w[:, None], y * w, rcond=None)
        p, q = solution[: degree + 1], np.concatenate([[1.0], solution[degree + 1 :]])
        q_prev = np.polyval(q[::-1], t)
        err = a * np.polyval(p[::-1], t) / q_prev - y
        if best is None or np.abs(err).max() < best[0]:
            best = (float(np.abs(err).max()), p, q)
        weights = weights * np.sqrt(np.abs(err)) + 1e-30
        weights /= weights.max()
    assert best is not None
    return best[1], best[2], best[0]


def fit_exp(degree: int = 6, iterations: int = 80) -> tuple[np.ndarray, float]:
    r = grid(-np.log(2) / 2, np.log(2) / 2)
    y = np.exp(r)
    weights = np.ones_like(r)
    best: tuple[float, np.ndarray] | None = None
    for _ in range(iterations):
        powers = r[:, None] ** np.arange(degree + 1)
        w = weights / y  # relative error
        c, *_ = np.linalg.lstsq(powers * w[:, None], y * w, rcond=None)
        err = (powers @ c - y) / y
        if best is None or np.abs(err).max() < best[0]:
            best = (float(np.abs(err).max()), c)
        weights = weights * np.sqrt(np.abs(err)) + 1e-30
        weights /= weights.max()
    assert best is not None
    return best[1], best[0]


def estrin32(coeffs: np.ndarray, t: np.float32, t2: np.float32) -> np.float32:
    """Evaluate like fast_math.estrin, in float32."""
    c = [np.float32(v) for v in coeffs]
    pairs = [c[i] + c[i + 1] * t for i in range(0, len(c) - 1, 2)]
    acc = pairs.pop() if len(c) % 2 == 0 else c[-1] * t2 + pairs.pop()
    for pair in reversed(pairs):
        acc = pair + t2 * acc
    return np.float32(acc)


def main() -> None:
    p, q, erf_err = fit_erf()
    a = np.float32(ERF_LIMIT)
    at_limit = a * estrin32(p, a * a, a**4) / estrin32(q, a * a, a**4)
    assert at_limit == np.float32(1.0), f"the rational is {at_limit!r} at the limit, not 1.0"
    c, exp_err = fit_exp()
    print(f"# erf fit, max abs error {erf_err:.2e} on [0, {ERF_LIMIT}] (float64)")
    print(f"ERF_P = ({', '.join(repr(float(v)) for v in p)})")
    print(f"ERF_Q = ({', '.join(repr(float(v)) for v in q)})")
    print(f"# exp fit, max relative error {exp_err:.2e} on [-ln2/2, ln2/2] (float64)")
    print(f"EXP_C = ({', '.join(repr(float(v)) for v in c)})")


if __name__ == "__main__":
    main()
