"""The project's exceptions: each message names the file, row or setting at fault and how to fix it."""

from __future__ import annotations


class DataFormatError(ValueError):
    """Bad input data; the message names the file, the row and the field, and how to fix it."""


class ProvenanceError(ValueError):
    """An output on disk was made from other inputs or settings than the ones in use (``provenance.Manifest``)."""


class StoreMismatchError(ProvenanceError):
    """A feature store, factor file or selection on disk was made with other settings, or from other data."""


class StageMismatchError(ProvenanceError):
    """A pipeline stage folder was made with other settings than the ones in use."""


class SettingsError(ValueError):
    """Settings that cannot work together; the message lists every problem found."""


class StoreCorruptError(StoreMismatchError):
    """A file a stage trusts is missing, truncated or altered; the message says how to recover."""


class NonFiniteError(ValueError):
    """NaN or Inf values where a number is needed (features, losses, scores); the message names the rows."""


class WriteError(OSError):
    """An output could not be written (a full disk, a read-only or unwritable folder); the message names the file."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class LockedError(RuntimeError):
    """Another run holds the output folder's lock; the message names its pid and host."""
