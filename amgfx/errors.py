"""Errors amgfx raises on purpose. Each message says what is wrong and what to try.

Anything unexpected inside capture, analysis or the passes reaches the user as an :class:`AmgfxError`
too: :func:`foreign_errors` is the one wrapper that catches every exception, and :func:`noted` lets the
interpreters say at which node it happened.
"""
import contextlib


class AmgfxError(Exception):
    """Base class of every error amgfx raises on purpose."""


class CaptureError(AmgfxError):
    """The model could not be captured into an FX graph (see the message for the op/module)."""


class PlanError(AmgfxError):
    """A pruning plan does not fit the model it is applied to."""


class ModelSpecError(AmgfxError):
    """A model given on the command line could not be found or loaded."""


class AnalysisError(AmgfxError):
    """Analysis found something it must not pass over (``strict=True``: an attention op in no site)."""


class RewriteError(AmgfxError):
    """A pass met a graph it cannot rewrite exactly (the message names the node and op)."""


class InternalError(AmgfxError):
    """Something amgfx did not expect went wrong inside it (the message names where; the cause is attached)."""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


@contextlib.contextmanager
def foreign_errors(cls=InternalError, what: str = "amgfx", describe=None):
    """The one place amgfx catches every exception: inside, anything that is not an :class:`AmgfxError`
    becomes ``cls``, with a message naming ``what`` (and the node the interpreters noted) and the
    original exception as its ``__cause__``. ``describe(exc)`` may write the whole message instead.

    Example:
        >>> with foreign_errors(RewriteError, "pass fix_shapes"):
        ...     with noted("at node view_3 (aten.view)"):
        ...         raise IndexError("list index out of range")
        Traceback (most recent call last):
        ...
        amgfx.errors.RewriteError: pass fix_shapes failed at node view_3 (aten.view): IndexError: list index out of range
    """
    try:
        yield
    except AmgfxError:
        raise
    except Exception as e:  # the wrapper: every foreign exception leaves amgfx as an AmgfxError
        if describe is not None:
            raise cls(describe(e)) from e
        where = " ".join(getattr(e, "__notes__", [])[:1])
        raise cls(f"{what} failed{' ' + where if where else ''}: {type(e).__name__}: {_first_line(e)}") from e


class noted:
    """Attach ``where`` (a node, an op, a group) to a foreign exception passing through, once: the
    innermost note wins, and :func:`foreign_errors` puts it in the message. Cheap enough for a
    loop over every node of a graph."""
    __slots__ = ("where",)

    def __init__(self, where):
        self.where = where

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is not None and isinstance(exc, Exception) and not isinstance(exc, AmgfxError) \
                and not getattr(exc, "__notes__", None):
            exc.add_note(self.where() if callable(self.where) else self.where)
        return False
