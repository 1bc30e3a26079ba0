"""fedpeft: federated, privacy-focused parameter-efficient fine-tuning on Flower."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``fedpeft.simulate`` and ``fedpeft.RunResult`` (the Python API, :mod:`fedpeft.api`), imported on first
    use so that ``import fedpeft`` and the CLI's start stay light."""
    if name in ("simulate", "RunResult", "resolve_config"):
        from fedpeft import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedpeft' has no attribute {name!r}")
