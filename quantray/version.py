"""quantray's version, in a module of its own: the package's face imports everything, and what
records the version (a run's manifest) must not import the face."""

__version__ = "0.1.0"
