"""Pure numeric helpers: no I/O, no imports with side effects."""

import math
from functools import reduce

GOLDEN = (1 + math.sqrt(5)) / 2


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def product(values: list[int]) -> int:
    return reduce(lambda x, y: x * y, values, 1)


class Matrix:
    def __init__(self, rows: list[list[float]]) -> None:
        self.rows = rows

    def transpose(self) -> "Matrix":
        return Matrix([list(col) for col in zip(*self.rows)])
