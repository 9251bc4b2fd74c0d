"""Every private Diffrax name this package touches, in one place.

They are why `pyproject.toml` pins `diffrax>=0.7.2,<0.8`: they are checked against that
range, and a new Diffrax minor version should be read against this file first.
"""

from diffrax._adjoint import _only_transpose_ys as only_transpose_ys
from diffrax._heuristics import is_sde as is_sde, is_unsafe_sde as is_unsafe_sde
from diffrax._integrate import SaveState as SaveState
from diffrax._saveat import save_y as save_y
