"""Every private Diffrax name this package touches, in one place.

They are why `pyproject.toml` pins `diffrax>=0.7.2,<0.8`: they are checked against that
range, and a new Diffrax minor version should be read against this file first. So
should the fields of Diffrax's loop `State` that `_adjoint.py` reads (`save_state`,
`dense_infos`, `event_mask`, `event_dense_info`, ...) and the layout of
`ConstantStepSize`'s controller state.
"""

from diffrax._heuristics import is_sde as is_sde, is_unsafe_sde as is_unsafe_sde
from diffrax._integrate import SaveState as SaveState
from diffrax._misc import linear_rescale as linear_rescale
