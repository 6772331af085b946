"""Errors amgfx raises on purpose. Each message says what is wrong and what to try."""


class AmgfxError(Exception):
    """Base class of every error amgfx raises on purpose."""


class CaptureError(AmgfxError):
    """The model could not be captured into an FX graph (see the message for the op/module)."""


class PlanError(AmgfxError):
    """A pruning plan does not fit the model it is applied to."""


class ModelSpecError(AmgfxError):
    """A model given on the command line could not be found or loaded."""


class RewriteError(AmgfxError):
    """A pass met a graph it cannot rewrite exactly (the message names the node and op)."""
