"""Bytes and files: one store over local folders and pyarrow.fs URIs, written whole or not at all
(store), stored calibration statistics (stats), the run directory's contract (artifacts). It never
builds or rebuilds a model."""
