"""amgfx: structured pruning of transformers as torch.fx graph passes (SNP + AMG).

    >>> import torch, timm, amgfx
    >>> m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    >>> print(amgfx.analyze(m, torch.randn(1, 3, 32, 32)).counts()["qk"])
    {'groups': 2, 'units': 384}
"""
from .errors import AmgfxError, CaptureError, ModelSpecError, PlanError, RewriteError
from .graph.capture import capture
from .analysis.coupling import CouplingGraph, Group, Member
from .scoring.calibrate import CalibrationError
from .scoring.criteria import AMG, SNP, Magnitude, Random, Taylor
from .planning import cost
from .planning.plan import Plan
from .api import Scores, analyze, apply, plan_for, prune, reconstruct, score
from .weights.recover import Iterative, distill_loss, recover
from .verify import VerifyReport, verify
from .decode import Decoder, decoder, generate
from .files import LoadError, load, save
from .runtime import export_onnx, onnx_parity, ort_session

__version__ = "0.1.0"
__all__ = ["decoder", "generate", "Decoder", "recover", "reconstruct", "distill_loss", "Iterative", "save", "load", "export_onnx", "ort_session", "onnx_parity", "LoadError", "cost", "analyze", "apply", "capture", "plan_for", "prune", "score", "verify", "Plan", "Scores", "VerifyReport",
           "CouplingGraph", "Group", "Member", "SNP", "AMG", "Taylor", "Magnitude", "Random",
           "AmgfxError", "CalibrationError", "CaptureError", "ModelSpecError", "PlanError", "RewriteError"]
