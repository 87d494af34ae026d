"""The shipped demo model's card: plain facts the API, the worker and the CLI need without
loading it (no torch here).

PIVOT_STRENGTH is the demo model's default K/T, chosen on ShapesBench's validation stream (never
on its benchmark pairs): the largest K at which both cascade modes keep 2x composition accuracy
within 5 points of native. The paper's 0.7 suits SD's 512 px objects; on 64 px shapes it lets the
high-resolution stage redraw the empty background as more, smaller shapes (bench/results/
shapesbench_2x.json reports every K of the sweep, 0.7 included).
"""

from __future__ import annotations

NAME = "demo"
NATIVE_SIZE = 64
PIVOT_STRENGTH = 0.4
