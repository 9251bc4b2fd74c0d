"""MkDocs hooks: links to Diffrax's documentation for the `[`diffrax.X`][]`
cross-references in the docstrings (the build is offline, so Diffrax's inventory is not
fetched)."""

_DIFFRAX = "https://docs.kidger.site/diffrax/api/"
_DIFFRAX_PAGES = {
    "diffeqsolve": ("diffeqsolve",),
    "adjoints": (
        "AbstractAdjoint",
        "RecursiveCheckpointAdjoint",
        "DirectAdjoint",
        "BacksolveAdjoint",
        "ImplicitAdjoint",
        "ForwardMode",
    ),
    "solvers/abstract_solvers": ("AbstractSolver", "AbstractWrappedSolver"),
    "solvers/ode_solvers": (
        "Euler",
        "Heun",
        "Midpoint",
        "Ralston",
        "Bosh3",
        "Tsit5",
        "Dopri5",
        "Dopri8",
    ),
    "terms": ("AbstractTerm", "ODETerm", "ControlTerm", "MultiTerm"),
    "brownian": ("VirtualBrownianTree", "UnsafeBrownianPath"),
    "saveat": ("SaveAt", "SubSaveAt"),
    "stepsize_controller": ("ConstantStepSize", "StepTo", "PIDController"),
}


def on_files(files, config):
    autorefs = config.plugins["autorefs"]
    for page, names in _DIFFRAX_PAGES.items():
        for name in names:
            autorefs.register_url(
                f"diffrax.{name}", f"{_DIFFRAX}{page}/#diffrax.{name}"
            )
    return files
