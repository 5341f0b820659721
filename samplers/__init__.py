"""How the next token or latent is drawn: locally typical sampling, fused CFG kernels, CFG++ steps."""

from samplers.cfgpp import (
    cfgpp_step,
    ddim_cfgpp_step,
    euler_ancestral_cfgpp_step,
    euler_cfgpp_step,
    flow_euler_cfgpp_step,
    sample_ddim_cfgpp,
    sample_euler_ancestral_cfgpp,
    sample_euler_cfgpp,
)
from samplers.kernels import cfg_log_softmax, cfg_typical_sample, typical_filter
from samplers.typical import LocallyTypicalWarper

__all__ = [
    "LocallyTypicalWarper",
    "cfg_log_softmax",
    "cfg_typical_sample",
    "cfgpp_step",
    "ddim_cfgpp_step",
    "euler_ancestral_cfgpp_step",
    "euler_cfgpp_step",
    "flow_euler_cfgpp_step",
    "sample_ddim_cfgpp",
    "sample_euler_ancestral_cfgpp",
    "sample_euler_cfgpp",
    "typical_filter",
]
