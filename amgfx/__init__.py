"""amgfx: structured pruning of transformers as torch.fx graph passes (SNP + AMG).

    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    >>> print(amgfx.analyze(m, torch.randn(1, 3, 32, 32)).counts()["qk"])
    {'groups': 2, 'units': 384}

The public names load on first use (PEP 562), so ``import amgfx`` and ``amgfx --help`` do not import
torch; ``amgfx.prune`` and the rest are the same objects they always were.
"""
import importlib

from .errors import AmgfxError, AnalysisError, CaptureError, ModelSpecError, PlanError, RewriteError

__version__ = "0.1.0"

# public name -> the module that defines it (the pipeline's order: graph, analysis, scoring, planning, ...)
_WHERE = {
    "capture": "graph.capture",
    "CouplingGraph": "analysis.coupling", "Group": "analysis.coupling", "Member": "analysis.coupling",
    "CalibrationError": "scoring.calibrate",
    "AMG": "scoring.criteria", "SNP": "scoring.criteria", "Magnitude": "scoring.criteria",
    "Random": "scoring.criteria", "Taylor": "scoring.criteria",
    "cost": "planning", "Plan": "planning.plan", "PlanConfig": "planning.config",
    "Scores": "api", "analyze": "api", "apply": "api", "plan_for": "api", "reconstruct": "api", "score": "api",
    "prune": "sequence",
    "RefitConfig": "weights.config", "RecoverConfig": "weights.config",
    "Iterative": "weights.recover", "distill_loss": "weights.recover", "recover": "weights.recover",
    "VerifyReport": "passes.oracle", "verify": "api",
    "Decoder": "decode", "decoder": "decode", "generate": "decode",
    "LoadError": "files", "load": "files", "save": "files",
    "export_onnx": "runtime", "onnx_parity": "runtime", "ort_session": "runtime",
}

__all__ = sorted(_WHERE) + ["AmgfxError", "AnalysisError", "CaptureError", "ModelSpecError", "PlanError", "RewriteError"]


def __getattr__(name: str):
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'amgfx' has no attribute {name!r}")
    module = importlib.import_module(f".{where}", __name__)
    value = getattr(module, name, None) or importlib.import_module(f".{where}.{name}", __name__)   # a submodule (cost)
    globals()[name] = value            # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
