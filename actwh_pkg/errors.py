"""Typed errors shared by every part of actwh; the CLI turns them into one-line messages."""


class ActwhError(Exception):
    """Base class: anything a user can cause and fix (bad input, missing files, wrong names)."""


class ModelLoadError(ActwhError):
    """A checkpoint folder or cache entry is missing or unreadable."""


class UnsupportedArchitecture(ActwhError):
    """The checkpoint's model_type (or one of its options) is not implemented."""


class PromptError(ActwhError):
    """A prompt file or a prompt is malformed, too long, or names a target that is not one token."""


class UnknownName(ActwhError):
    """An unknown scalar, target, query, parameter or hook site."""

    def __init__(self, kind: str, name: str, valid):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid: {', '.join(map(str, self.valid))}")


class WarehouseError(ActwhError):
    """The warehouse file is locked, of another schema version, or a write did not land."""


class SAEError(ActwhError):
    """A sparse autoencoder's files, shapes or activation are wrong for this model."""
