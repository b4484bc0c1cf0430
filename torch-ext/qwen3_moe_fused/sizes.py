"""Integer arithmetic of the launch code (grids, block sizes) in plain Python.

triton.cdiv and triton.next_power_of_2 are constexpr functions in recent Triton releases:
from host code each call costs ~2.4 µs (triton 3.9, measured on CPU), and one forward+backward
of the MoE block made 17 of them. Same results for the non-negative sizes used here.
"""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for 0, as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
