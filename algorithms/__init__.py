"""Algorithm plug-ins. `ALGORITHMS` is the one registry (fleetrec.algorithms.protocol); `register`
adds a plug-in and refuses a taken name. Built-in algorithms are imported when first looked up."""
from __future__ import annotations

from fleetrec.algorithms.protocol import ALGORITHMS, AlgorithmBase, algorithms_supporting, make_algorithm, register

__all__ = ["ALGORITHMS", "AlgorithmBase", "algorithms_supporting", "make_algorithm", "register"]
