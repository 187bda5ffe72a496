"""Importable task functions for the stress harness (tests/stress_harness.py)."""

from __future__ import annotations

import os
import time

import numpy as np


def ident(x):
    return x


def add(x, y):
    return x + y


def sq(x):
    return x * x


def boom(x):
    raise ValueError(f"boom {x}")


def die(x):
    os._exit(3)


def nap(t, x):
    time.sleep(t)
    return x


def asum(a):
    return float(a.sum())


def amake(n, v):
    return np.full(n, float(v))


def arow(i):
    return np.full(8, float(i))


def afill(out, i):
    out[i] = i
    return i


def aplus(a, k):
    return a + k


def sq_or(x):
    """x*x; raises for x == -1, dies for x == -2, sleeps for x == -3 (returns 9)."""
    if x == -1:
        raise ValueError("boom -1")
    if x == -2:
        os._exit(3)
    if x == -3:
        time.sleep(0.05)
    return x * x
