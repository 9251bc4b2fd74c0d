import importlib.metadata

from ._adjoint import ReversibleAdjoint as ReversibleAdjoint
from ._solver import Reversible as Reversible


__version__ = importlib.metadata.version("diffrax_reversible")
