import importlib.metadata

from ._adjoint import ReversibleAdjoint as ReversibleAdjoint
from ._check_stability import (
    check_stability as check_stability,
    StabilityReport as StabilityReport,
    suggest_coupling as suggest_coupling,
)
from ._reversible_solver import AbstractReversibleSolver as AbstractReversibleSolver
from ._solver import Reversible as Reversible
from ._stability import (
    is_linearly_stable as is_linearly_stable,
    spectral_radius as spectral_radius,
    stability_function as stability_function,
    step_matrix as step_matrix,
)


__version__ = importlib.metadata.version("diffrax_reversible")
