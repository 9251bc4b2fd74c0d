import importlib.metadata

from ._adjoint import ReversibleAdjoint as ReversibleAdjoint
from ._reversible_solver import AbstractReversibleSolver as AbstractReversibleSolver
from ._solver import Reversible as Reversible
from ._stability import (
    check_stability as check_stability,
    is_linearly_stable as is_linearly_stable,
    spectral_radius as spectral_radius,
    stability_function as stability_function,
    StabilityReport as StabilityReport,
    step_matrix as step_matrix,
    suggest_coupling as suggest_coupling,
)


__version__ = importlib.metadata.version("diffrax_reversible")
