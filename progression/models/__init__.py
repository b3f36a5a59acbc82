"""Models: the FiLM-conditioned U-Net, diffeomorphic warping and the progression generator.

Modules: `layers` (CPU-fast Conv3D / Pointwise / Downsample / Upsample2x), `normalization`
(GroupNorm with FiLM and SiLU folded in), `conv_kernels` (the compiled CPU kernels both use),
`warp` (warping, scaling and squaring, composition, Jacobians), `unet`, `generator`.
"""

from progression.models.generator import ProgressionGenerator
from progression.models.generator import forecast_from_velocity
from progression.models.unet import UNet

__all__ = ['ProgressionGenerator', 'UNet', 'forecast_from_velocity']
