"""The model's trainable modules, in the order of the data flow: CFRM (encoder), Controller and SC-Tuners
(denoiser), TFA and task prompts (decoder)."""

from .cfrm import CFRM, AdaptiveBlock, CFRMLevel
from .controller import Controller
from .nafblock import LayerNorm2d, NAFBlock, SimpleGate
from .sc_tuner import SCTuner, SCTuners
from .tfa import TFA, PromptProjection, TaskPrompts, TFALayer

__all__ = [
    "CFRM",
    "TFA",
    "AdaptiveBlock",
    "CFRMLevel",
    "Controller",
    "LayerNorm2d",
    "NAFBlock",
    "PromptProjection",
    "SCTuner",
    "SCTuners",
    "SimpleGate",
    "TFALayer",
    "TaskPrompts",
]
