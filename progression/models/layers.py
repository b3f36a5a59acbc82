"""Convolution layers tuned for XLA:CPU, parameter-compatible with flax.linen.

XLA:CPU runs a native 3D convolution at ~10-25 GFLOP/s on our 2-core machines;
the same 3x3x3 convolution written with 2D convolutions over (y, z), x folded
into the batch axis (a free reshape), runs several times faster and is exact
(the sum of the same products). Two ways to fold the three x (depth) taps:
  * input side: three 2D convs, one per tap, on x-shifted copies of the input,
    summed (the kernel gradient of this form is what XLA differentiates well);
  * output side: ONE 2D conv with the three taps' kernels stacked on the output
    channels ([3, 3, Cin, 3*Cout]), then out[x] = y0[x-1] + y1[x] + y2[x+1]:
    no shifted input copies and a 3x wider GEMM, 1.5-4x faster for our thin
    layers (Cout 3-32), most of all the 16->3 velocity head.
`conv3x3x3` runs the output side forward and, through a custom VJP, the output
side again for the input gradient (a convolution of the output gradient with the
flipped kernel) and the input side for the kernel gradient (the output side for
thin outputs such as the 3-channel velocity head, where it is faster).
Faster still on CPU are our compiled kernels (`conv_kernels`, an XLA FFI custom call):
`impl='compiled'` runs the forward, the input gradient and the kernel gradient with them,
output channels zero-padded to a multiple of 8 (the 3-channel velocity head computes 8 and
keeps 3), and the depth-tap form beyond 64 channels or in other dtypes than float32; the
same kernels run the 1x1x1 `Pointwise` projections and the 2x `Downsample` / `Upsample2x`
(`resample2x`), which XLA:CPU runs as thin matmuls with transposes around them.
`nn.ConvTranspose` with kernel 2 / stride 2 is ~11x slower than the einsum +
reshape used here. On GPU/TPU the native convolution is the fast one, so
`impl='auto'` picks by `jax.default_backend()`: 'native' there; on CPU 'compiled', or
'depth_taps' where the kernels cannot be built (no C++ compiler).

Every layer keeps the parameter names and shapes of its flax counterpart
(`kernel` (3,3,3,Cin,Cout) + `bias` for `Conv3D` as `nn.Conv`; (2,2,2,Cin,Cout)
for `Downsample` as a stride-2 `nn.Conv` and for `Upsample2x` as
`nn.ConvTranspose`), so weights can be copied between them (tests do).

All arrays are `[batch, x, y, z, channels]`.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from progression.errors import ProgressionError
from progression.models import conv_kernels

Array = jax.Array
Dtype = Any
IMPLS = ('auto', 'compiled', 'depth_taps', 'native')
default_kernel_init = nn.initializers.lecun_normal()


def resolve_impl(impl: str) -> str:
  """'auto' -> 'compiled' on CPU ('depth_taps' if the kernels cannot be built), 'native'
  elsewhere; others pass through ('compiled' raises if the kernels are unavailable)."""
  if impl not in IMPLS:
    raise ProgressionError(f'conv impl must be one of {IMPLS}, got {impl!r}')
  on_cpu = jax.default_backend() == 'cpu'
  if impl == 'auto':
    if not on_cpu:
      return 'native'
    return 'compiled' if conv_kernels.available() else 'depth_taps'
  if impl == 'compiled':
    if not on_cpu:
      raise ProgressionError("conv impl 'compiled' runs on CPU only; use 'native' or 'auto'")
    if not conv_kernels.available():
      raise ProgressionError(conv_kernels.unavailable_reason())
  return impl


_DN_2D = ('NHWC', 'HWIO', 'NHWC')


def _conv2d_yz(x: Array, kernel: Array) -> Array:
  """'SAME' 3x3 convolution over (y, z) with x folded into the batch axis.

  x: [B, X, Y, Z, Cin]; kernel: [3, 3, Cin, C] -> [B, X, Y, Z, C].
  """
  b, nx, ny, nz, cin = x.shape
  y = lax.conv_general_dilated(x.reshape(b * nx, ny, nz, cin), kernel, (1, 1), 'SAME',
                               dimension_numbers=_DN_2D)
  return y.reshape(b, nx, ny, nz, kernel.shape[-1])


def _input_side_taps(x: Array, kernel: Array) -> Array:
  """Sum over kx of 2D convs of the x-shifted input with kernel[kx] (see module docstring)."""
  nx = x.shape[1]
  xp = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
  out = None
  for kx in range(3):
    yi = _conv2d_yz(xp[:, kx:kx + nx], kernel[kx])
    out = yi if out is None else out + yi
  return out


def _output_side_taps(x: Array, kernel: Array) -> Array:
  """One 2D conv to [B, X, Y, Z, 3*Cout] (taps kx stacked), then shifted adds along x."""
  cout = kernel.shape[-1]
  y = _conv2d_yz(x, jnp.concatenate([kernel[0], kernel[1], kernel[2]], axis=-1))
  y0, y1, y2 = y[..., :cout], y[..., cout:2 * cout], y[..., 2 * cout:]
  zero = jnp.zeros_like(y1[:, :1])
  # out[x] = sum_kx x[x + kx - 1] * kernel[kx]: tap 0 comes from plane x - 1, tap 2 from x + 1.
  return (y1 + jnp.concatenate([zero, y0[:, :-1]], axis=1)
          + jnp.concatenate([y2[:, 1:], zero], axis=1))


@jax.custom_vjp
def _depth_taps(x: Array, kernel: Array) -> Array:
  return _output_side_taps(x, kernel)


def _depth_taps_fwd(x, kernel):
  return _output_side_taps(x, kernel), (x, kernel)


_THIN_OUTPUT = 4  # Cout up to this: the kernel gradient of the output-side form is faster.


def _output_side_kernel_grad(x: Array, dy: Array) -> Array:
  """Kernel gradient [3, 3, 3, Cin, Cout] of `_output_side_taps` at x [B,X,Y,Z,Cin] for the
  output gradient dy [B,X,Y,Z,Cout]: one 2D kernel-gradient conv against dy shifted by each
  x tap (stacked on channels, [B,X,Y,Z,3 Cout]). 1.4-2x faster than the input side for the
  velocity head (Cout 3), slower for wider outputs."""
  cin, cout = x.shape[-1], dy.shape[-1]
  zero = jnp.zeros_like(dy[:, :1])
  # Tap kx of plane x feeds out[x + 1 - kx].
  shifted = jnp.concatenate([jnp.concatenate([dy[:, 1:], zero], axis=1), dy,
                             jnp.concatenate([zero, dy[:, :-1]], axis=1)], axis=-1)
  stacked = jnp.zeros((3, 3, cin, 3 * cout), dy.dtype)
  (grad,) = jax.vjp(lambda k: _conv2d_yz(x, k), stacked)[1](shifted)
  return jnp.moveaxis(grad.reshape(3, 3, cin, 3, cout), 3, 0)


def _depth_taps_kernel_grad(x: Array, dy: Array, kernel: Array) -> Array:
  if kernel.shape[-1] <= _THIN_OUTPUT:
    return _output_side_kernel_grad(x, dy).astype(kernel.dtype)
  (dkernel,) = jax.vjp(lambda k: _input_side_taps(x, k), kernel)[1](dy)
  return dkernel


def _flipped(kernel: Array) -> Array:
  """The kernel of the input gradient: dx = correlation of dy with the flipped kernel,
  in/out channels swapped."""
  return jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4)


def _depth_taps_bwd(residuals, dy):
  x, kernel = residuals
  return _output_side_taps(dy, _flipped(kernel)), _depth_taps_kernel_grad(x, dy, kernel)


_depth_taps.defvjp(_depth_taps_fwd, _depth_taps_bwd)


def _zero_channels(a: Array, channels: int) -> Array:
  """a [..., C] zero-padded to `channels` on the last axis."""
  return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, channels - a.shape[-1])])


def _compiled_or_taps(x: Array, kernel: Array) -> Array:
  """The compiled forward kernel (3x3x3 or 1x1x1 `kernel`), its output channels zero-padded
  to the next multiple of 8 (sliced off again) when that is all it lacks, else the
  output-side taps (a matmul for 1x1x1)."""
  cout = kernel.shape[-1]
  padded = conv_kernels.padded_channels(cout, x.dtype)
  if padded is None:
    return _output_side_taps(x, kernel) if kernel.shape[0] == 3 else jnp.dot(x, kernel[0, 0, 0])
  return conv_kernels.forward(x, _zero_channels(kernel, padded))[..., :cout]


def _compiled_kernel_grad(x: Array, dy: Array, kernel: Array) -> Array:
  """The compiled kernel gradient (dy zero-padded to a supported channel count), else the
  depth-tap one (a matmul for 1x1x1)."""
  cout, size = dy.shape[-1], kernel.shape[0]
  padded = conv_kernels.padded_channels(cout, x.dtype)
  if padded is None and size == 1:
    return jnp.einsum('...i,...o->io', x, dy)[None, None, None].astype(kernel.dtype)
  if padded is None:
    return _depth_taps_kernel_grad(x, dy, kernel)
  return conv_kernels.kernel_grad(x, _zero_channels(dy, padded), size)[..., :cout].astype(
      kernel.dtype)


@jax.custom_vjp
def _compiled(x: Array, kernel: Array) -> Array:
  return _compiled_or_taps(x, kernel)


def _compiled_fwd(x, kernel):
  return _compiled_or_taps(x, kernel), (x, kernel)


def _compiled_bwd(residuals, dy):
  x, kernel = residuals
  return _compiled_or_taps(dy, _flipped(kernel)), _compiled_kernel_grad(x, dy, kernel)


_compiled.defvjp(_compiled_fwd, _compiled_bwd)


def conv3x3x3(x: Array, kernel: Array, impl: str = 'auto') -> Array:
  """'SAME' zero-padded, stride-1 3x3x3 convolution (no bias).

  Args:
    x: [B, X, Y, Z, Cin].
    kernel: [3, 3, 3, Cin, Cout], indexed [kx, ky, kz] like `nn.Conv`
      (cross-correlation: out[x] = sum_k x[x + k - 1] * kernel[k]).
    impl: 'compiled', 'depth_taps', 'native' or 'auto' (see module docstring).
  Returns:
    [B, X, Y, Z, Cout] in the dtype of `x`/`kernel`.
  """
  impl = resolve_impl(impl)
  if impl == 'native':
    return lax.conv_general_dilated(
        x, kernel, (1, 1, 1), 'SAME',
        dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
  if impl == 'compiled':
    return _compiled(x, kernel)
  return _depth_taps(x, kernel)


class Pointwise(nn.Module):
  """1x1x1 convolution (a matmul over channels at every voxel); params as
  `nn.Dense(features)` (`kernel` [Cin, features], `bias` [features]).

  XLA:CPU runs these thin matmuls (e.g. 32 -> 16 channels at 32^3 voxels) at ~20 GFLOP/s;
  `impl='compiled'` runs them, and their gradients, through the compiled kernels as 1x1x1
  convolutions (5-10x faster at those sizes). Other impls are `jnp.dot`.
  """
  features: int
  use_bias: bool = True
  impl: str = 'auto'
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = default_kernel_init
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, X, Y, Z, Cin] -> [B, X, Y, Z, features]."""
    if x.ndim != 5:
      raise ProgressionError(f'Pointwise expects [batch, x, y, z, channels], got shape {x.shape}')
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if resolve_impl(self.impl) == 'compiled':
      y = _compiled(x, kernel[None, None, None])
    else:
      y = jnp.dot(x, kernel)
    return y if bias is None else y + bias


class Conv3D(nn.Module):
  """3x3x3, stride 1, 'SAME' convolution; params as `nn.Conv(features, (3,3,3))`.

  Attributes:
    features: output channels.
    use_bias: add a learned bias (`bias`, shape [features]).
    impl: 'auto' | 'compiled' | 'depth_taps' | 'native' (see module docstring).
    dtype: computation dtype (None: the input's); params are `param_dtype`.
  """
  features: int
  use_bias: bool = True
  impl: str = 'auto'
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = default_kernel_init
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array, fold_bias: bool = False) -> Array | tuple[Array, Array]:
    """x: [B, X, Y, Z, Cin] -> [B, X, Y, Z, features].

    fold_bias=True returns (convolution, bias) unadded, for a consumer that folds the bias
    into its own per-channel arithmetic (`normalization.GroupNorm`'s `offset`), saving a pass
    over the output.
    """
    if x.ndim != 5:
      raise ProgressionError(f'Conv3D expects [batch, x, y, z, channels], got shape {x.shape}')
    kernel = self.param('kernel', self.kernel_init, (3, 3, 3, x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv3x3x3(x, kernel, self.impl)
    if fold_bias:
      return y, jnp.zeros((self.features,), y.dtype) if bias is None else bias
    return y if bias is None else y + bias


def space_to_depth(x: Array, factor: int) -> Array:
  """Folds factor^3 blocks into channels: [B,X,Y,Z,C] -> [B,X/f,Y/f,Z/f,f^3*C].

  Channel order is (i, j, k, c) for the offset (i, j, k) inside the block.
  Lossless; `depth_to_space` inverts it. Sizes must be divisible by `factor`.
  """
  if factor == 1:
    return x
  b, nx, ny, nz, c = x.shape
  if nx % factor or ny % factor or nz % factor:
    raise ProgressionError(
        f'spatial shape {(nx, ny, nz)} must be divisible by {factor} for space_to_depth')
  f = factor
  x = x.reshape(b, nx // f, f, ny // f, f, nz // f, f, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, nx // f, ny // f, nz // f, f * f * f * c)


def depth_to_space(x: Array, factor: int) -> Array:
  """Inverse of `space_to_depth`: [B,X,Y,Z,f^3*C] -> [B,fX,fY,fZ,C]."""
  if factor == 1:
    return x
  b, nx, ny, nz, fc = x.shape
  f = factor
  if fc % (f ** 3):
    raise ProgressionError(f'channels {fc} not divisible by {f}^3 for depth_to_space')
  c = fc // f ** 3
  x = x.reshape(b, nx, ny, nz, f, f, f, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, nx * f, ny * f, nz * f, c)


def _down_xla(x: Array, kernel: Array) -> Array:
  """out[X] = sum_{o, ci} x[2X + o, ci] kernel[o, ci]: space-to-depth + one matmul."""
  return jnp.dot(space_to_depth(x, 2), kernel.reshape(-1, kernel.shape[-1]))


def _up_xla(x: Array, kernel: Array) -> Array:
  """out[2X + o] = sum_ci x[X, ci] kernel[o, ci]: one matmul + depth-to-space."""
  cin, cout = kernel.shape[-2:]
  return depth_to_space(jnp.dot(x, kernel.transpose(3, 0, 1, 2, 4).reshape(cin, 8 * cout)), 2)


def _resample_or_xla(x: Array, kernel: Array, up: bool) -> Array:
  """The compiled 2x resampling kernel (output channels zero-padded to a multiple of 8 when
  that is all it lacks), else the XLA form."""
  cout = kernel.shape[-1]
  padded = conv_kernels.padded_channels(cout, x.dtype)
  if padded is None:
    return _up_xla(x, kernel) if up else _down_xla(x, kernel)
  return conv_kernels.resample(x, _zero_channels(kernel, padded), up)[..., :cout]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _compiled_resample(x: Array, kernel: Array, up: bool) -> Array:
  return _resample_or_xla(x, kernel, up)


def _compiled_resample_fwd(x, kernel, up):
  return _resample_or_xla(x, kernel, up), (x, kernel)


def _compiled_resample_bwd(up, residuals, dy):
  x, kernel = residuals
  # Down and up are each other's input gradient, with the kernel's channel axes swapped.
  dx = _resample_or_xla(dy, kernel.swapaxes(3, 4), not up)
  cout = dy.shape[-1]
  padded = conv_kernels.padded_channels(cout, x.dtype)
  if padded is None:
    (dkernel,) = jax.vjp(lambda k: _resample_or_xla(x, k, up), kernel)[1](dy)
  else:
    dkernel = conv_kernels.resample_kernel_grad(x, _zero_channels(dy, padded), up)[..., :cout]
  return dx, dkernel.astype(kernel.dtype)


_compiled_resample.defvjp(_compiled_resample_fwd, _compiled_resample_bwd)


def resample2x(x: Array, kernel: Array, up: bool, impl: str = 'auto') -> Array:
  """Kernel-2 stride-2 resampling, kernel [2, 2, 2, Cin, Cout], offsets o in {0, 1}^3:
  down (up=False) [B,2X,2Y,2Z,Cin] -> out[X] = sum_{o,ci} x[2X + o, ci] kernel[o, ci];
  up (up=True) [B,X,Y,Z,Cin] -> out[2X + o] = sum_ci x[X, ci] kernel[o, ci].
  impl 'compiled' (and 'auto' on CPU): the compiled kernels, which read and write the
  strided voxels directly (XLA's space-to-depth transposes cost as much as its matmul);
  otherwise one matmul and a space/depth reshuffle."""
  if resolve_impl(impl) == 'compiled':
    return _compiled_resample(x, kernel, up)
  return _up_xla(x, kernel) if up else _down_xla(x, kernel)


class Downsample(nn.Module):
  """Learned 2x downsampling: kernel-2 stride-2 convolution (`resample2x`).

  Params as `nn.Conv(features, (2,2,2), strides=(2,2,2), padding='VALID')`:
  `kernel` [2,2,2,Cin,Cout], `bias` [Cout]. Each output voxel sees exactly its
  2x2x2 input block, so the cost is one matmul (1/27 x 8 of a 3x3x3 conv).
  """
  features: int
  impl: str = 'auto'
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = default_kernel_init

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, X, Y, Z, Cin] (even sizes) -> [B, X/2, Y/2, Z/2, features]."""
    cin = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (2, 2, 2, cin, self.features),
                        self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if any(n % 2 for n in x.shape[1:4]):
      raise ProgressionError(
          f'Downsample: spatial shape {x.shape[1:4]} must be divisible by 2')
    return resample2x(x, kernel, up=False, impl=self.impl) + bias


class Upsample2x(nn.Module):
  """Kernel-2 stride-2 transposed convolution (`resample2x`, up).

  Params as `nn.ConvTranspose(features, (2,2,2), strides=(2,2,2))`: `kernel`
  [2,2,2,Cin,Cout] (flax applies it flipped: output offset i uses kernel[1-i]),
  `bias` [Cout].
  """
  features: int
  impl: str = 'auto'
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = default_kernel_init

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, X, Y, Z, Cin] -> [B, 2X, 2Y, 2Z, features]."""
    cin = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (2, 2, 2, cin, self.features),
                        self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return resample2x(x, kernel[::-1, ::-1, ::-1], up=True, impl=self.impl) + bias
