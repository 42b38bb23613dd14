#!/usr/bin/env python3
"""Fit the initial coefficients of the rational activation (Padé Activation Unit).

    R(x) = (a_0 + a_1 x + ... + a_m x^m) / Q(x)
    version "B":  Q(x) = 1 + | b_1 x + b_2 x^2 + ... + b_n x^n |
    version "A":  Q(x) = 1 + |b_1| |x| + |b_2| |x|^2 + ... + |b_n| |x|^n

For every target in TARGETS, both versions and every degree pair (m, n) in 1..8 x 1..8 this finds
coefficients that (nearly) minimise the maximum absolute error on [-3, 3], measured on the fixed grid
``numpy.linspace(-3, 3, 100001)``, and writes them to ``iapt_kernels/data/rational_fits.json``.

Usage::

    python scripts/fit_rational.py                      # regenerate everything (writes the JSON)
    python scripts/fit_rational.py --only gelu          # one target, all degrees, print only
    python scripts/fit_rational.py --degrees 5 4        # one degree pair, all targets, print only
    python scripts/fit_rational.py --only relu --degrees 5 4 --versions B

Partial runs (``--only`` / ``--degrees`` / ``--versions``) print their results and never write the
JSON.  Everything is deterministic: a fixed grid, no random numbers, no seeds, and each
(target, version) is fitted by one process from its own starting points, so a partial run
reproduces the corresponding entries of a full run exactly.

Method
------
Work in the scaled variable u = x / 3 in [-1, 1] (coefficients alpha_j = a_j 3^j, c_k = b_k 3^k),
which keeps the monomial basis well scaled.

1. Starting points: the linearised least-squares fit (minimise sum (P - f (1 + D))^2 on 2001
   points, with D = sum c_k u^k for "B" and sum c_k |u|^k for "A"; linear in all coefficients), the
   least-squares polynomial (all b_k = 0), and - for a degree pair (m, n) - the fits of (m - 1, n)
   and (m, n - 1) padded with a zero coefficient (so the error never increases with the degree).
2. Minimax refinement of the *true* error, absolute values included, by the differential
   correction algorithm (a sequence of linear programs, HiGHS through ``scipy.optimize.linprog``):
     - "A": Q = 1 + sum c_k |u|^k with c_k >= 0 is linear in c, so the problem is quasi-convex and
       differential correction converges to its global optimum (on the points used).
     - "B": Q = 1 + |D(u)|.  With the sign pattern of D fixed the problem is again quasi-convex;
       two patterns are solved to their optimum: "()" D >= 0 (Q = 1 + D, smooth; b_1 = 0) and
       "(0,)" sign(u) D >= 0 (Q = 1 + |u| E(u), a kink at 0).  The two best of these and the chosen
       fits of the lower degrees are then refined with the pattern left free ("free<-..."): |D| is
       kept exactly where that is convex and bounded below by s D (s = current sign of D) where it
       is concave, so every step still lowers the true error while the roots of D (the kinks of Q)
       move, split off 0 or appear.  This finds fits with extra kinks, e.g. for relu and gelu at
       low degrees, that no single fixed pattern gives.
   The linear programs are written relative to the current iterate and divided by its error, so
   they stay well scaled down to errors of ~1e-15, and each step is limited by a box trust region.
   Points enter by exchange: a uniform base set plus the neighbourhoods of every local maximum of
   the error on the full 100001-point grid that exceeds the current level, until the full-grid
   maximum equals the working-set maximum.
3. Candidates (all of the above, plus the lower-degree fits themselves) are converted back to a_j,
   b_k and checked: finite, |coefficient| <= 1e4, |R| <= 1e3 on [-5, 5], and no spike between grid
   points (max error on a 10x finer grid, 1000001 points, within 1e-4 relative of the grid max).
   Of those the one with the smallest max abs error on the 100001-point grid, evaluated with a
   plain Horner scheme in x, is kept and that error is stored.

The published PAU initialisations (PUBLISHED below, copied from the PAU code repositories) are used
*only* for the comparison printed at the end and stored as PUBLISHED_MAX_ERROR; they are never used
as starting points or as fits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# One BLAS thread per worker process: the work is parallelised over processes instead.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
from published_paus import PUBLISHED, PUBLISHED_NOT_COMPARED  # noqa: E402  (beside this script)
from scipy.optimize import linprog  # noqa: E402
from scipy.special import erf, expit  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(REPO, "iapt_kernels", "data", "rational_fits.json")

LO, HI = -3.0, 3.0
N_GRID = 100001  # the grid the fits are optimised on and their stored error is measured on
N_CHECK = 1000001  # a 10x finer grid, only reported (how far the sup may exceed the grid max)
MAX_DEGREE = 8
VERSIONS = ("A", "B")
LEAKY_RELU_SLOPE = 0.01
MAX_ABS_COEFFICIENT = 1e4  # fits with a larger |a_j| or |b_k| are rejected as absurd
OUTSIDE = 5.0  # sanity check range [-5, 5]
ERROR_FLOOR = 2e-15  # stop refining below this: float64 round-off of f and R on [-3, 3]
SPIKE_TOL = 1e-4  # a candidate whose max error on the 10x finer grid exceeds the grid max by
#                   more than this (relative) has a spike between grid points: used only if
#                   nothing else is left
LP_BUDGET = 80  # linear programs per refinement (a refinement that needs more is stalling)
MAX_NEW_POINTS = 40  # local maxima of the error added to the working set at a time
PATTERN_TOL = 1e-9  # relative slack of the sign-pattern constraint (LPs are solved to ~1e-10)


def _relu(x):
    return np.maximum(x, 0.0)


def _leaky_relu(x):
    return np.where(x >= 0.0, x, LEAKY_RELU_SLOPE * x)


def _gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))  # exact (erf) GELU


def _silu(x):
    return x * expit(x)


TARGETS = {
    "relu": _relu,
    "leaky_relu": _leaky_relu,
    "gelu": _gelu,
    "silu": _silu,
    "tanh": np.tanh,
    "sigmoid": expit,
}


# --------------------------------------------------------------------------------------------------
# Evaluation in x (the formula of the package; plain Horner, float64)
# --------------------------------------------------------------------------------------------------
def rational_eval(num, den, version, x):
    """R(x) for numerator a_0..a_m and denominator b_1..b_n, in float64."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    p = np.full_like(x, num[-1])
    for a in num[-2::-1]:
        p = p * x + a
    if version == "B":
        d = np.full_like(x, den[-1])
        for b in den[-2::-1]:
            d = d * x + b
        q = 1.0 + np.abs(d * x)
    else:
        ax = np.abs(x)
        bb = np.abs(den)
        d = np.full_like(x, bb[-1])
        for b in bb[-2::-1]:
            d = d * ax + b
        q = 1.0 + d * ax
    return p / q


def grid(npts=N_GRID):
    return np.linspace(LO, HI, npts)


def max_abs_error(name, num, den, version, npts=N_GRID):
    x = grid(npts)
    return float(np.max(np.abs(rational_eval(num, den, version, x) - TARGETS[name](x))))


# --------------------------------------------------------------------------------------------------
# Fitting in u = x / 3
# --------------------------------------------------------------------------------------------------
_X = grid()
_U = _X / HI
_HIGHS = dict(primal_feasibility_tolerance=1e-10, dual_feasibility_tolerance=1e-10, time_limit=0.5)


def _sign(u):
    return np.where(u < 0.0, -1.0, 1.0)


def _pattern_sign(u, pattern):
    """s(u) = prod_r sign(u - r) for a B pattern given as a tuple of roots (sign(0) = +1)."""
    s = np.ones_like(u)
    for r in pattern:
        s = s * np.where(u < r, -1.0, 1.0)
    return s


def _basis(u, m, n, version, pattern):
    """Numerator basis u^j and the denominator basis of Q - 1 (signed by the pattern for "B")."""
    vp = u[:, None] ** np.arange(m + 1)
    if version == "A":
        vq = np.abs(u)[:, None] ** np.arange(1, n + 1)
    else:
        vq = u[:, None] ** np.arange(1, n + 1)
        if pattern != "free":
            vq = vq * _pattern_sign(u, pattern)[:, None]
    return vp, vq


def _pq(u, alpha, c, version):
    """True P and Q (absolute values included) at u for scaled coefficients."""
    p = np.polynomial.polynomial.polyval(u, alpha)
    if version == "A":
        q = 1.0 + np.abs(u) * np.polynomial.polynomial.polyval(np.abs(u), np.abs(c))
    else:
        q = 1.0 + np.abs(u * np.polynomial.polynomial.polyval(u, c))
    return p, q


def _err(f, alpha, c, version, idx=None):
    u = _U if idx is None else _U[idx]
    p, q = _pq(u, alpha, c, version)
    return np.abs(p / q - (f if idx is None else f[idx]))


def _pattern_ok(u, c, version, pattern):
    """Does the denominator satisfy the pattern ("A": c >= 0; "B": s(u) D(u) >= 0, and b_1 = 0 when
    0 is not a root, since D(0) = 0 and D may not change sign there)?"""
    if version == "A":
        return bool(np.all(c >= 0.0))
    if pattern == "free":
        return True
    if 0.0 not in pattern and c[0] != 0.0:
        return False
    d = u * np.polynomial.polynomial.polyval(u, c)
    return bool(np.all(_pattern_sign(u, pattern) * d >= -PATTERN_TOL * (1.0 + np.sum(np.abs(c)))))


def _local_maxima(e):
    left = np.concatenate([[True], e[1:] >= e[:-1]])
    right = np.concatenate([e[:-1] >= e[1:], [True]])
    return np.nonzero(left & right)[0]


def _solve_lp(cost, a_ub, b_ub, bounds):
    """HiGHS dual simplex (no presolve: these programs are small and dense); other settings only
    after a numerical failure.  None if no solution (a program that needs more than _HIGHS's time
    limit is given up: it only happens when progress has stalled anyway)."""
    for method, presolve in (("highs-ds", False), ("highs-ipm", True)):
        try:
            res = linprog(
                cost,
                A_ub=a_ub,
                b_ub=b_ub,
                bounds=bounds,
                method=method,
                options=dict(_HIGHS, presolve=presolve),
            )
        except ValueError:
            continue
        if res.status == 0:
            return res
        if res.status == 1:  # iteration or time limit
            return None
    return None


def _top_maxima(e, level, k=MAX_NEW_POINTS):
    """Indices (with their two neighbours) of the k largest local maxima of e above level."""
    lm = _local_maxima(e)
    lm = lm[e[lm] > level]
    if len(lm) > k:
        lm = lm[np.argsort(e[lm])[-k:]]
    new = np.concatenate([lm + j for j in (-1, 0, 1)])
    return np.unique(new[(new >= 0) & (new < N_GRID)])


_BASE = np.unique(np.concatenate([np.linspace(0, N_GRID - 1, 301).round().astype(int), [N_GRID // 2]]))


def _refine(f, m, n, version, pattern, alpha, c, bound, budget=LP_BUDGET):
    """Differential correction with point exchange; returns (alpha, c, error on the full grid).

    Minimises max |P(u) / Q(u) - f(u)| over the 100001-point grid.  Each step solves, for the
    current iterate (P_k, Q_k) with error delta_k, the linear program

        min z  s.t.  (f - delta_k) Q - P <= z Q_k,   P - (f + delta_k) Q <= z Q_k

    on a working set of points, written in the step relative to the iterate and divided by delta_k
    (well scaled however small delta_k is), with a box trust region on the step.  Any z < 0 gives
    a smaller error on the working set; a step is accepted only if it lowers the error on the full
    grid, else the points that spoilt it (local maxima of the new error) join the working set.

    - "A", or "B" with a fixed pattern (tuple of the sign changes of D, constraint s D >= 0):
      Q = 1 + (basis) . c is linear, the problem is quasi-convex and this converges to its optimum.
    - "B" with pattern "free": Q = 1 + |D| is kept exactly where that is convex (two rows, +D and
      -D) and replaced by the lower bound 1 + s_k D, s_k = sign(D_k), where it is concave.  Every
      LP-feasible point then satisfies the true inequalities, so the error still decreases
      monotonically, and the roots of D (the kinks of Q) can move.
    At most `budget` linear programs are solved.
    """
    e_full = _err(f, alpha, c, version)
    delta = float(e_full.max())
    work = np.union1d(_BASE, _top_maxima(e_full, 0.5 * delta))  # working set (grid indices)
    force = np.zeros(N_GRID, dtype=bool)  # points that spoilt a step: always in the programs
    thin = np.zeros(N_GRID, dtype=bool)
    thin[_BASE[::2]] = True  # a thin subset always in the programs (and where a pattern is imposed)
    nv = m + n + 2
    cost = np.zeros(nv)
    cost[-1] = 1.0
    fix_b1 = version == "B" and pattern != "free" and 0.0 not in pattern
    u_thin = _U[thin]
    vq_thin = _basis(u_thin, m, n, version, pattern)[1]
    rho = 1.0
    stall = fails = retries = 0
    while budget > 0 and delta > ERROR_FLOOR:
        budget -= 1
        # active set: working points above half the current level, the thin subset, forced points
        act = work[(e_full[work] >= 0.5 * delta) | thin[work] | force[work]]
        u, fi = _U[act], f[act]
        vp, vq = _basis(u, m, n, version, pattern)
        p, q = _pq(u, alpha, c, version)
        sc = delta
        lo = fi - delta
        hi = fi + delta
        zq = -q[:, None]
        if pattern == "free":
            d = vq @ c
            s = _sign(d)
            rows = [
                np.hstack([-vp, (lo * s)[:, None] * vq, zq]),  # (f - delta)(1 + s D) - P
                np.hstack([vp, -(hi * s)[:, None] * vq, zq]),
            ]  # P - (f + delta)(1 + s D)
            rhs = [p - lo * q, hi * q - p]
            cv = lo > 0.0  # (f - delta)(1 + |D|) convex: add the row with -s
            if np.any(cv):
                rows.append(np.hstack([-vp[cv], -(lo[cv] * s[cv])[:, None] * vq[cv], zq[cv]]))
                rhs.append(p[cv] - lo[cv] * (1.0 - s[cv] * d[cv]))
            cv = hi < 0.0  # -(f + delta)(1 + |D|) convex
            if np.any(cv):
                rows.append(np.hstack([vp[cv], (hi[cv] * s[cv])[:, None] * vq[cv], zq[cv]]))
                rhs.append(hi[cv] * (1.0 - s[cv] * d[cv]) - p[cv])
        else:
            rows = [np.hstack([-vp, lo[:, None] * vq, zq]), np.hstack([vp, -hi[:, None] * vq, zq])]
            rhs = [p - lo * q, hi * q - p]
            if version == "B":  # pattern: (signed basis) . c >= 0, on the thin subset
                rows.append(np.hstack([np.zeros((len(u_thin), m + 1)), -vq_thin, np.zeros((len(u_thin), 1))]))
                rhs.append(vq_thin @ c)
        t = rho / sc
        lo_a = np.maximum((-bound[0] - alpha) / sc, -t)
        hi_a = np.minimum((bound[0] - alpha) / sc, t)
        lo_c = np.maximum(((0.0 if version == "A" else -bound[1]) - c) / sc, -t)
        hi_c = np.minimum((bound[1] - c) / sc, t)
        if fix_b1:
            lo_c[0] = hi_c[0] = 0.0
        bounds = list(zip(lo_a, hi_a)) + list(zip(lo_c, hi_c)) + [(None, None)]
        res = _solve_lp(cost, np.vstack(rows), np.concatenate(rhs) / sc, bounds)
        if res is None:
            fails += 1
            rho /= 4.0
            if fails >= 3:
                break
            continue
        fails = 0
        y = res.x
        step = sc * y[:-1]
        a2 = alpha + step[: m + 1]
        c2 = c + step[m + 1 :]
        if version == "A":
            c2 = np.maximum(c2, 0.0)
        if fix_b1:
            c2[0] = 0.0
        e2 = _err(f, a2, c2, version)
        d2 = float(e2.max())
        on_boundary = np.max(np.abs(step)) > 0.999 * rho
        if d2 < delta and _pattern_ok(u_thin, c2, version, pattern):
            rel = (delta - d2) / delta
            alpha, c, e_full, delta = a2, c2, e2, d2
            work = np.union1d(work, _top_maxima(e_full, 0.5 * delta))
            retries = 0
            if on_boundary:
                rho *= 4.0
            elif y[-1] > -1e-9 or rel < 1e-10:
                break
            stall = stall + 1 if rel < 1e-8 else 0
            if stall >= 4:
                break
            continue
        # rejected: did points outside the program spoil the step?
        spoilers = _top_maxima(e2, max(delta, float(np.max(e2[act]))))
        spoilers = spoilers[~np.isin(spoilers, act)]
        if len(spoilers) and retries < 3:
            work = np.union1d(work, spoilers)
            force[spoilers] = True
            retries += 1
            continue
        retries = 0
        if y[-1] > -1e-4 or (not on_boundary and y[-1] > -1e-7):
            break  # only a tiny improvement was promised: the programs are at their accuracy
        rho = min(rho, float(np.max(np.abs(step)))) / 4.0
        if rho < 1e-13 * (1.0 + float(np.max(np.abs(np.concatenate([alpha, c]))))):
            break
    return alpha, c, delta


_LS_IDX = np.linspace(0, N_GRID - 1, 2001).round().astype(int)


def _ls_start(f, m, n, version):
    """Linearised least squares: min sum (P - f (1 + D))^2, D = sum c_k u^k ("B") or c_k |u|^k ("A")."""
    u = _U[_LS_IDX]
    fi = f[_LS_IDX]
    vp = u[:, None] ** np.arange(m + 1)
    vq = (np.abs(u) if version == "A" else u)[:, None] ** np.arange(1, n + 1)
    sol = np.linalg.lstsq(np.hstack([vp, -fi[:, None] * vq]), fi, rcond=None)[0]
    alpha, c = sol[: m + 1], sol[m + 1 :]
    if version == "A":
        c = np.abs(c)  # only |c_k| enters
    return alpha, c


def _poly_start(f, m, n):
    return np.polynomial.polynomial.polyfit(_U[_LS_IDX], f[_LS_IDX], m), np.zeros(n)


def _to_x(alpha, c):
    """Scaled (u) coefficients -> (a_0..a_m, b_1..b_n) in x."""
    a = np.asarray(alpha) / HI ** np.arange(len(alpha))
    b = np.asarray(c) / HI ** np.arange(1, len(c) + 1)
    return a, b


def _sane(num, den, version):
    """Finite, |coefficients| <= MAX_ABS_COEFFICIENT, and |R| moderate on [-5, 5]."""
    coef = np.concatenate([num, den])
    if not np.all(np.isfinite(coef)) or np.max(np.abs(coef)) > MAX_ABS_COEFFICIENT:
        return False
    r = rational_eval(num, den, version, np.linspace(-OUTSIDE, OUTSIDE, 10001))
    return bool(np.all(np.isfinite(r)) and np.max(np.abs(r)) <= 1e3)


_X_CHECK = grid(N_CHECK)


def _fine_error(name, num, den, version):
    """Max error on the 10x finer grid, to reject candidates with a spike between grid points."""
    return float(np.max(np.abs(rational_eval(num, den, version, _X_CHECK) - TARGETS[name](_X_CHECK))))


def _fixed_patterns(version, n):
    if version == "A":
        return ["none"]
    return [(), (0.0,)]


def fit_chain(name, versions, degrees):
    """Fit `name` in `versions` for all (m, n) in `degrees` plus everything they start from.

    The degree pairs are done in lexicographic order, (m - 1, n) and (m, n - 1) before (m, n), and
    "A" before "B" (a "B" fit also starts from the "A" fit of the same degrees with its odd |x|
    terms dropped), so "A" is always fitted.  Returns {(version, m, n): (num, den, err, how,
    seconds)} for the requested versions and pairs.
    """
    f = TARGETS[name](_X)
    want = set(degrees)
    mmax = max(m for m, _ in want)
    nmax = max(n for _, n in want)
    todo = [
        (m, n)
        for m in range(1, mmax + 1)
        for n in range(1, nmax + 1)
        if any(m <= mm and n <= nn for mm, nn in want)
    ]
    state = {}  # (version, m, n, pattern) -> (alpha, c) (scaled coefficients); pattern "final": chosen
    out = {}

    def padded(version, m, n, pat):
        """The fits of (m - 1, n) and (m, n - 1) for `pat`, as (m, n) coefficient vectors."""
        res = []
        if (version, m - 1, n, pat) in state:
            a, c = state[(version, m - 1, n, pat)]
            res.append((np.append(a, 0.0), c.copy()))
        if (version, m, n - 1, pat) in state:
            a, c = state[(version, m, n - 1, pat)]
            res.append((a.copy(), np.append(c, 0.0)))
        return res

    for m, n in todo:
        for version in VERSIONS:
            t0 = time.perf_counter()
            bound = (
                MAX_ABS_COEFFICIENT * HI ** np.arange(m + 1),
                MAX_ABS_COEFFICIENT * HI ** np.arange(1, n + 1),
            )
            starts0 = [_ls_start(f, m, n, version), _poly_start(f, m, n)]
            if version == "B":
                a, c = state[("A", m, n, "final")]
                c = c.copy()
                c[0::2] = 0.0  # keep the even powers: 1 + sum c_k u^k, c_k >= 0, is a "B" denominator
                starts0.append((a.copy(), c))
            cands = []  # (err, alpha, c, how)
            for pat in _fixed_patterns(version, n):
                starts = []
                for a, c in starts0 + padded(version, m, n, pat):
                    if version == "B" and 0.0 not in pat:
                        c = c.copy()
                        c[0] = 0.0
                    if _pattern_ok(_U, c, version, pat):
                        starts.append((a, c))
                errs = [float(_err(f, a, c, version).max()) for a, c in starts]
                a0, c0 = starts[int(np.argmin(errs))]
                a1, c1, e1 = _refine(f, m, n, version, pat, a0, c0, bound)
                state[(version, m, n, pat)] = (a1, c1)
                cands.append((e1, a1, c1, pat if version == "B" else "A"))
            if version == "B":
                # free-pattern polish (kinks may move) of the two best fixed-pattern fits and of
                # the chosen fits of the lower degrees
                cands.sort(key=lambda r: r[0])
                seeds = [(a, c, f"free<-{how}") for _, a, c, how in cands[:2]]
                seeds += [(a, c, "free<-lower") for a, c in padded(version, m, n, "final")]
                for a0, c0, how in seeds:
                    a1, c1, e1 = _refine(f, m, n, version, "free", a0, c0, bound)
                    cands.append((e1, a1, c1, how))
            # the chosen fits of the lower degrees themselves (same functions): never worse
            cands += [(np.inf, a, c, "lower") for a, c in padded(version, m, n, "final")]
            ranked = []
            for _, a1, c1, how in cands:
                num, den = _to_x(a1, c1)
                if _sane(num, den, version):
                    err = max_abs_error(name, num, den, version)
                    fine = _fine_error(name, num, den, version)
                    spiky = fine > err * (1.0 + SPIKE_TOL) + 1e-14
                    ranked.append((spiky, err, fine, str(how), num, den, a1, c1))
            if not ranked:
                raise RuntimeError(f"no sane fit for {name} {version} {(m, n)}")
            ranked.sort(key=lambda r: (r[0], r[2] if r[0] else r[1]))
            _, err, _, how, num, den, a1, c1 = ranked[0]
            state[(version, m, n, "final")] = (a1, c1)
            if (m, n) in want and version in versions:
                out[(version, m, n)] = (
                    tuple(float(v) for v in num),
                    tuple(float(v) for v in den),
                    err,
                    how,
                    time.perf_counter() - t0,
                )
    return out


def _task(args):
    name, versions, degrees = args
    t0 = time.perf_counter()
    res = fit_chain(name, versions, degrees)
    return name, res, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def published_errors():
    """[(key, source, max abs error on the 100001-point grid)] for every compared published entry."""
    return [
        ((name, v, m, n), src, max_abs_error(name, num, den, v)) for name, v, m, n, src, num, den in PUBLISHED
    ]


def published_best():
    best = {}
    for key, _, err in published_errors():
        best[key] = min(err, best.get(key, np.inf))
    return best


def write_fits(fits, path=OUTPUT):
    """Write the fits and the published comparison as the package's JSON data (one fit a line)."""
    pub = published_best()
    order = lambda k: (list(TARGETS).index(k[0]), k[1], k[2], k[3])  # noqa: E731
    about = (
        "Initial coefficients of the rational activation (PAU): minimax fits of common activations. "
        "GENERATED by scripts/fit_rational.py, do not edit by hand. "
        "R(x) = (a_0 + a_1 x + ... + a_m x^m) / Q(x); version B: Q = 1 + |b_1 x + ... + b_n x^n|; "
        "version A: Q = 1 + |b_1||x| + ... + |b_n||x|^n. Each fit: numerator a_0..a_m, denominator b_1..b_n, "
        "max_error = max |R - f| on numpy.linspace(*grid), float64. leaky_relu has negative slope "
        "leaky_relu_slope; gelu is the exact (erf) GELU; identity is exact and not listed. "
        "published_max_error: the best published PAU initialisation's error for that key on the same grid "
        "(for comparison only)."
    )
    entry = lambda k: {"name": k[0], "version": k[1], "m": k[2], "n": k[3]}  # noqa: E731
    fit_rows = [
        json.dumps(
            {
                **entry(k),
                "numerator": [float(v) for v in fits[k][0]],
                "denominator": [float(v) for v in fits[k][1]],
                "max_error": float(fits[k][2]),
            }
        )
        for k in sorted(fits, key=order)
    ]
    pub_rows = [json.dumps({**entry(k), "max_error": float(pub[k])}) for k in sorted(pub, key=order)]
    lines = [
        "{",
        f' "about": {json.dumps(about)},',
        f' "grid": {json.dumps([LO, HI, N_GRID])},',
        f' "leaky_relu_slope": {json.dumps(LEAKY_RELU_SLOPE)},',
        ' "fits": [',
        ",\n".join("  " + r for r in fit_rows),
        " ],",
        ' "published_max_error": [',
        ",\n".join("  " + r for r in pub_rows),
        " ]",
        "}",
        "",
    ]
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines))
    os.replace(tmp, path)


def print_table(fits, version, m_n_list=None):
    names = list(TARGETS)
    print(f"\nmax abs error on [-3, 3] ({N_GRID} points), version {version}")
    print("  (m,n)  " + "".join(f"{nm:>12s}" for nm in names))
    keys = sorted({(k[2], k[3]) for k in fits if k[1] == version})
    for m, n in keys:
        row = [fits.get((nm, version, m, n)) for nm in names]
        print(f"  ({m},{n})  " + "".join(f"{r[2]:12.3e}" if r else f"{'-':>12s}" for r in row))


def compare_published(fits):
    print("\nComparison with the published PAU initialisations (same formula, same grid):")
    print(f"  {'key':34s} {'published':>11s} {'ours':>11s} {'ours/pub':>9s}  source")
    worse = []
    for key, src, perr in published_errors():
        if key not in fits:
            continue
        ours = fits[key][2]
        flag = "" if ours <= perr else "  <-- WORSE"
        if ours > perr:
            worse.append(key)
        print(f"  {str(key):34s} {perr:11.3e} {ours:11.3e} {ours / perr:9.2e}  {src}{flag}")
    print("  not compared:")
    for what, _src, why in PUBLISHED_NOT_COMPARED:
        print(f"    {what}: {why}")
    return worse


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--only",
        action="append",
        choices=list(TARGETS),
        metavar="NAME",
        help="fit only this target (repeatable); prints, does not write",
    )
    ap.add_argument(
        "--degrees",
        nargs=2,
        type=int,
        metavar=("M", "N"),
        help="fit only this degree pair (plus the lower degrees it warm-starts from); prints, does not write",
    )
    ap.add_argument("--versions", default="AB", help='versions to fit, e.g. "B" (default "AB")')
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--output", default=OUTPUT, help="JSON file to write (full runs only)")
    args = ap.parse_args(argv)

    names = args.only or list(TARGETS)
    versions = [v for v in VERSIONS if v in args.versions.upper()]
    if args.degrees:
        m, n = args.degrees
        if not (1 <= m <= MAX_DEGREE and 1 <= n <= MAX_DEGREE):
            ap.error("degrees must be in 1..8")
        degrees = [(m, n)]
    else:
        degrees = [(m, n) for m in range(1, MAX_DEGREE + 1) for n in range(1, MAX_DEGREE + 1)]
    partial = bool(args.only or args.degrees or len(versions) < len(VERSIONS))

    # one task per target (both versions: "B" starts from "A"); biggest first
    order = {"silu": 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4, "gelu": 5}
    tasks = sorted([(nm, versions, degrees) for nm in names], key=lambda t: order[t[0]])
    t0 = time.perf_counter()
    fits, info = {}, {}

    def report(r):
        print(f"fitted {r[0]:10s}: {len(r[1]):3d} fits in {r[2]:7.1f} s", flush=True)

    if args.jobs > 1 and len(tasks) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(min(args.jobs, len(tasks))) as pool:
            results = []
            for r in pool.imap_unordered(_task, tasks):
                report(r)
                results.append(r)
    else:
        results = []
        for t in tasks:
            results.append(_task(t))
            report(results[-1])
    for name, res, _secs in results:
        for (version, m, n), (num, den, err, how, s) in res.items():
            fits[(name, version, m, n)] = (num, den, err)
            info[(name, version, m, n)] = (how, s)
    elapsed = time.perf_counter() - t0

    for v in versions:
        print_table(fits, v)
    # how much larger the sup can be between grid points: a 10x finer grid
    gaps = sorted(
        (
            ((max_abs_error(k[0], f[0], f[1], k[1], N_CHECK) - f[2]) / max(f[2], 1e-300), k, f[2])
            for k, f in fits.items()
        ),
        reverse=True,
    )
    print(f"\nlargest relative increases of the max error on a {N_CHECK}-point grid:")
    for gap, key, err in gaps[:3]:
        print(f"  {gap:9.2e}  {key}  (grid max {err:.3e})")
    print("\nworst fit per target and version (and the (8, 8) fit):")
    for nm in names:
        for v in versions:
            keys = [k for k in fits if k[0] == nm and k[1] == v]
            if keys:
                kw = max(keys, key=lambda k: fits[k][2])
                e88 = fits.get((nm, v, 8, 8), (None, None, float("nan")))[2]
                print(f"  {nm:10s} {v}: worst {fits[kw][2]:.3e} at {kw[2:]},  (8,8) {e88:.3e}")
    worst = sorted(fits.items(), key=lambda kv: -kv[1][2])[:10]
    print("\nworst fits overall:")
    for key, (_num, _den, err) in worst:
        print(f"  {str(key):34s} {err:.4e}  (from: {info[key][0]})")
    if args.degrees:
        for key in sorted(fits):
            num, den, err = fits[key]
            print(f"\n{key}: err {err!r} from {info[key][0]}\n  num {num}\n  den {den}")
    worse = compare_published(fits)
    print(f"\nfitting time {elapsed:.1f} s with {args.jobs} process(es)")
    if not partial:
        write_fits(fits, args.output)
        print(f"wrote {args.output} ({len(fits)} fits)")
    else:
        print("partial run: JSON not written")
    if worse:
        print(f"WARNING: worse than published for {worse}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
