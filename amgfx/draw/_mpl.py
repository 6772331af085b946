"""matplotlib without a display (the Agg backend), imported once for every picture."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt", "save"]


def save(fig, path, data: dict | None = None, dpi: int = 120) -> None:
    """Write ``fig`` to ``path``; ``data`` (JSON) goes into the PNG's ``amgfx`` text chunk, so what a
    picture shows can be read back from the file (``PIL.Image.open(path).text["amgfx"]``)."""
    import json
    meta = {"amgfx": json.dumps(data)} if data is not None and str(path).endswith(".png") else None
    fig.savefig(path, dpi=dpi, metadata=meta)
    plt.close(fig)
