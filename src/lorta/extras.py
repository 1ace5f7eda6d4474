"""Optional dependencies: the library itself needs none of lorta's extras; a feature that does says which to install."""

from __future__ import annotations

__all__ = ["MissingDependencyError"]


class MissingDependencyError(ImportError):
    """A package the chosen job needs is not installed; the message gives the exact pip command."""
