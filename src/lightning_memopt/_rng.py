"""Seed mixing shared by the core: splitmix64's output function.

APOLLO's projections (:mod:`lightning_memopt.optim.projection`) and INT8 stochastic rounding
(:mod:`lightning_memopt.quant.int8`) each turn a small integer pair (a seed and a counter)
into a :class:`torch.Generator` seed. Nearby pairs must give unrelated generator seeds, which
is what splitmix64's finaliser does (Steele, Lea and Flood, "Fast splittable pseudorandom
number generators", OOPSLA 2014). Written once here; each caller keeps its own way of
combining its pair into the 64-bit input, so that every seed it drew before stays the same.

Example:
    >>> splitmix64(1) != splitmix64(2)
    True
    >>> 0 <= splitmix64(GOLDEN_GAMMA) < 2**64
    True
"""

from __future__ import annotations

# The odd 64-bit increment of splitmix64 (2^64 / golden ratio): multiplying by it spreads
# consecutive integers over the whole 64-bit range.
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1


def splitmix64(state: int) -> int:
    """splitmix64's output function of a 64-bit ``state`` (taken modulo 2^64): a 64-bit integer
    that changes in about half its bits when one bit of ``state`` changes.

    Example:
        >>> hex(splitmix64(0x9E3779B97F4A7C15))  # splitmix64's first output from seed 0
        '0xe220a8397b1dcdaf'
    """
    z = state & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)
