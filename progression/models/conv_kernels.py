"""Compiled convolution kernels for XLA:CPU (`conv_kernels.cc`, XLA FFI custom calls).

XLA:CPU runs our thin channels-last 3D convolutions at 20-100 GFLOP/s and their kernel
gradients at 20-80 GFLOP/s even in the depth-tap form of `layers`, and the U-Net's thin
matmuls (1x1x1 skip projections, the kernel-2 stride-2 down/up sampling with their
space-to-depth transposes) at ~20. The direct kernels in `conv_kernels.cc` run the 3x3x3
forward at 100-210 and its kernel gradient at 110-200 GFLOP/s on the 2-core AVX-512 machines
(`experiments/benchmark.py`), and compute those other layers without a transpose:
  * `forward` / `kernel_grad`: 'SAME' KxKxK convolutions, K = 3 or 1 (pointwise);
  * `resample` / `resample_kernel_grad`: kernel-2 stride-2 down- and upsampling;
  * `scale_shift_silu` / `scale_shift_silu_grad`: silu(x * scale + shift) per (batch, channel),
    the U-Net blocks' GroupNorm + FiLM + SiLU in one pass each way.
`layers` uses them for the forward and both gradients of `conv3x3x3`, `Pointwise`,
`Downsample` and `Upsample2x`, and `normalization` for `scale_shift_silu` (impl 'compiled'),
output channels zero-padded to a multiple of 8 (`padded_channels`), and XLA's forms beyond 64
channels or for other dtypes than float32.

The library is compiled from the shipped source the first time it is needed, with the host's
instruction set (`-march=native`), and cached in `$PROGRESSION_CACHE_DIR` (default
`~/.cache/progression`) under a name that hashes the source, the flags, jaxlib and the CPU:
a few seconds once per machine. `$CXX` names the compiler (default `c++`). Without a working
compiler `available()` is False and `impl='auto'` keeps the depth-tap form (a warning says
why); `PROGRESSION_COMPILED_CONV=0` turns the kernels off.
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from progression.errors import ProgressionError

Array = jax.Array
SOURCE = Path(__file__).with_name('conv_kernels.cc')
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')
MAX_CHANNELS = 64  # Output channels: a multiple of 8 up to this.
_SYMBOLS = {'forward': 'ProgressionConvForward', 'kernel_grad': 'ProgressionConvKernelGrad',
            'down': 'ProgressionDownForward', 'up': 'ProgressionUpForward',
            'down_kernel_grad': 'ProgressionDownKernelGrad',
            'up_kernel_grad': 'ProgressionUpKernelGrad',
            'scale_shift_silu': 'ProgressionScaleShiftSilu',
            'scale_shift_silu_grad': 'ProgressionScaleShiftSiluGrad'}
_TARGETS = {part: f'progression_conv_{part}' for part in _SYMBOLS}
SIZES = (3, 1)  # Kernel sizes: 3x3x3 convolutions and pointwise (1x1x1) ones.


def supports(out_channels: int, dtype) -> bool:
  """Whether the kernels compute a convolution with this many output channels in `dtype`."""
  return (jnp.dtype(dtype) == jnp.float32 and 0 < out_channels <= MAX_CHANNELS
          and out_channels % 8 == 0)


def padded_channels(out_channels: int, dtype) -> int | None:
  """The output channels to compute `out_channels` with (zero-padded to a multiple of 8), or
  None when the kernels cannot (more than MAX_CHANNELS, or not float32)."""
  padded = -(-out_channels // 8) * 8
  return padded if supports(padded, dtype) else None


def available() -> bool:
  """True if the kernels are built (or can be) and registered with XLA:CPU."""
  return _load() is None


def unavailable_reason() -> str | None:
  """Why `available()` is False (None when it is True)."""
  return _load()


def cache_dir() -> Path:
  """Where built libraries live: $PROGRESSION_CACHE_DIR or ~/.cache/progression."""
  root = os.environ.get('PROGRESSION_CACHE_DIR') or Path.home() / '.cache' / 'progression'
  return Path(root)


def _compiler() -> list[str]:
  return shlex.split(os.environ.get('CXX') or 'c++')


def _cpu_fingerprint() -> str:
  """The CPU's model and flags (a library built with -march=native runs only on its kind)."""
  try:
    lines = Path('/proc/cpuinfo').read_text().splitlines()
    return '|'.join(sorted({l for l in lines if l.startswith(('model name', 'flags'))}))
  except OSError:
    return platform.processor() or platform.machine()


def library_path() -> Path:
  """The cached library for this source, compiler, flags, jaxlib and CPU."""
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), ' '.join(_compiler() + list(FLAGS)).encode(),
               importlib.metadata.version('jaxlib').encode(), _cpu_fingerprint().encode()):
    key.update(part)
    key.update(b'\0')
  return cache_dir() / f'conv_kernels-{key.hexdigest()[:16]}.so'


def build(path: Path) -> None:
  """Compiles SOURCE into `path` (through a temporary file, so a reader never sees half a
  library). Raises ProgressionError with the compiler's message on failure."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=path.parent)
  os.close(fd)
  command = _compiler() + list(FLAGS) + ['-I', jax.ffi.include_dir(), str(SOURCE), '-o', tmp]
  try:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise ProgressionError(f'building {SOURCE.name} failed ({shlex.join(command)}):\n'
                             f'{result.stderr.strip()[-2000:]}')
    os.replace(tmp, path)
  except OSError as e:
    raise ProgressionError(f'building {SOURCE.name}: cannot run {command[0]!r}: {e}') from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@functools.cache
def _load() -> str | None:
  """Builds (if needed), loads and registers the kernels once; returns why not, or None."""
  if os.environ.get('PROGRESSION_COMPILED_CONV', '1') == '0':
    return 'PROGRESSION_COMPILED_CONV=0'
  path = library_path()
  try:
    if not path.exists():
      logging.info('building the compiled convolution kernels into %s', path)
      build(path)
    library = ctypes.cdll.LoadLibrary(str(path))
    for part, target in _TARGETS.items():
      jax.ffi.register_ffi_target(
          target, jax.ffi.pycapsule(getattr(library, _SYMBOLS[part])), platform='cpu')
  except (ProgressionError, OSError, AttributeError) as e:
    reason = f'compiled convolution kernels unavailable, using the XLA depth-tap form: {e}'
    logging.warning(reason)
    return reason
  return None


def _require() -> None:
  reason = _load()
  if reason is not None:
    raise ProgressionError(reason)


def _call(part: str, results, *args: Array):
  """Runs kernel `part` (a `_SYMBOLS` key) on args, returning arrays shaped as `results`
  (one jax.ShapeDtypeStruct, or a tuple of them)."""
  _require()
  return jax.ffi.ffi_call(_TARGETS[part], results, vmap_method='sequential')(*args)


def forward(x: Array, kernel: Array) -> Array:
  """'SAME' KxKxK cross-correlation: x [B,X,Y,Z,Cin] float32, kernel [K,K,K,Cin,Cout] (K in
  `SIZES`, Cout supported, see `supports`) -> [B,X,Y,Z,Cout]."""
  return _call('forward', jax.ShapeDtypeStruct(x.shape[:-1] + kernel.shape[-1:], x.dtype),
               x, kernel)


def kernel_grad(x: Array, dy: Array, size: int = 3) -> Array:
  """Gradient [K,K,K,Cin,Cout] (K = `size`, in `SIZES`) of sum(forward(x, kernel) * dy) with
  respect to the kernel, for x [B,X,Y,Z,Cin] and dy [B,X,Y,Z,Cout] (Cout supported)."""
  return _call('kernel_grad',
               jax.ShapeDtypeStruct((size,) * 3 + (x.shape[-1], dy.shape[-1]), x.dtype), x, dy)


def _resampled_shape(x: Array, up: bool, channels: int) -> tuple[int, ...]:
  b, nx, ny, nz, _ = x.shape
  if up:
    return (b, 2 * nx, 2 * ny, 2 * nz, channels)
  if nx % 2 or ny % 2 or nz % 2:
    raise ProgressionError(f'2x downsampling needs even sizes, got {x.shape[1:4]}')
  return (b, nx // 2, ny // 2, nz // 2, channels)


def resample(x: Array, kernel: Array, up: bool) -> Array:
  """Kernel-2 stride-2 resampling with kernel [2,2,2,Cin,Cout] (Cout supported), offsets
  o = (i, j, k) in {0, 1}^3:
    down (up=False): x [B,2X,2Y,2Z,Cin] -> out[X] = sum_{o,ci} x[2X + o, ci] kernel[o, ci]
    up (up=True):    x [B,X,Y,Z,Cin] -> out[2X + o] = sum_ci x[X, ci] kernel[o, ci].
  """
  return _call('up' if up else 'down',
               jax.ShapeDtypeStruct(_resampled_shape(x, up, kernel.shape[-1]), x.dtype),
               x, kernel)


def resample_kernel_grad(x: Array, dy: Array, up: bool) -> Array:
  """Gradient [2,2,2,Cin,Cout] of sum(resample(x, kernel, up) * dy) with respect to the kernel
  (dy on the grid `resample` returns; Cout supported)."""
  return _call('up_kernel_grad' if up else 'down_kernel_grad',
               jax.ShapeDtypeStruct((2, 2, 2, x.shape[-1], dy.shape[-1]), x.dtype), x, dy)


def scale_shift_silu(x: Array, scale: Array, shift: Array) -> Array:
  """silu(x * scale + shift) for x [B,X,Y,Z,C] float32 (C supported, see `supports`) and
  per-(batch, channel) scale and shift [B, C]."""
  return _call('scale_shift_silu', jax.ShapeDtypeStruct(x.shape, x.dtype), x, scale, shift)


def scale_shift_silu_grad(x: Array, scale: Array, shift: Array, dout: Array
                          ) -> tuple[Array, Array, Array]:
  """The gradients (dx, dscale, dshift) of sum(scale_shift_silu(x, scale, shift) * dout)."""
  shapes = tuple(jax.ShapeDtypeStruct(a.shape, x.dtype) for a in (x, scale, shift))
  return tuple(_call('scale_shift_silu_grad', shapes, x, scale, shift, dout))
