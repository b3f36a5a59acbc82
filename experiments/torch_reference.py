"""PyTorch + MONAI comparator of the progression generator, for `experiments.benchmark`.

The same architecture as `progression.models.generator.ProgressionGenerator` with the
default model config, built from MONAI blocks: covariate MLP -> space-to-depth (2x2x2
voxels -> 8 channels) -> FiLM-conditioned 3D U-Net (MONAI `Convolution` 3x3x3 convs,
kernel-2 stride-2 down/transposed-up convs, GroupNorm, SiLU, 1x1x1 skip projections) ->
3x3x3 velocity head with a tanh bound -> MONAI `DVF2DDF` scaling and squaring (7 steps,
border padding) on the coarse grid -> trilinear x2 upsampling -> MONAI `Warp` of the
baseline -> central-difference Jacobian determinant. Parameters map one to one onto ours
(`load_flax_params`; tests/benchmark_test.py checks that both give the same outputs and
loss). The training step mirrors `progression.steps.train_step`: the loss terms of
`progression.losses.total_loss` that the default config enables, global-norm clipping and
AdamW.

Run by the benchmark in its own process, without jax (the `bench` extra:
`pip install torch==2.13.0 monai`). Layout here is PyTorch's `[batch, channels, x, y, z]`.

  python -m experiments.torch_reference --sizes=64 --repetitions=5 --out=/tmp/torch.json
"""

import json
import resource
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from absl import app, flags
from monai.networks import blocks

from experiments.timing import time_calls
from torch import nn

NUM_CLASSES = 19  # len(progression.labels.CLASS_IDS); no jax import in this process.


def num_groups_for(channels: int, max_groups: int = 8) -> int:
  """Largest divisor of `channels` <= max_groups (as `progression.models.unet`)."""
  return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def conv(cin: int, cout: int, kernel: int = 3, stride: int = 1,
         transposed: bool = False) -> nn.Module:
  """A MONAI `Convolution` with bias, no norm/activation ('same' padding for stride 1)."""
  extra = dict(padding=0, output_padding=0) if transposed else (
      dict(padding=0) if stride > 1 else {})
  return blocks.Convolution(3, cin, cout, strides=stride, kernel_size=kernel, conv_only=True,
                            is_transposed=transposed, **extra)


class ResBlock(nn.Module):
  """(conv -> GroupNorm -> FiLM -> SiLU) -> (conv -> GroupNorm -> SiLU) + skip."""

  def __init__(self, cin: int, features: int, cond_features: int):
    super().__init__()
    groups = num_groups_for(features)
    self.conv1, self.conv2 = conv(cin, features), conv(features, features)
    self.norm1 = nn.GroupNorm(groups, features, eps=1e-5)
    self.norm2 = nn.GroupNorm(groups, features, eps=1e-5)
    self.film = nn.Linear(cond_features, 2 * features)
    nn.init.zeros_(self.film.weight)
    nn.init.zeros_(self.film.bias)
    self.skip = conv(cin, features, kernel=1) if cin != features else nn.Identity()

  def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    h = self.norm1(self.conv1(x))
    gamma, beta = self.film(cond)[:, :, None, None, None].chunk(2, dim=1)
    h = F.silu(h * (1.0 + gamma) + beta)
    h = F.silu(self.norm2(self.conv2(h)))
    return h + self.skip(x)


class UNet(nn.Module):
  """FiLM-conditioned 3D U-Net, levels and channels as `progression.models.unet.UNet`."""

  def __init__(self, cin: int, features: Sequence[int], cond_features: int):
    super().__init__()
    self.features = tuple(features)
    self.enc, self.down = nn.ModuleList(), nn.ModuleList()
    c = cin
    for level, f in enumerate(self.features):
      if level > 0:
        self.down.append(conv(c, f, kernel=2, stride=2))
      self.enc.append(ResBlock(f if level > 0 else c, f, cond_features))
      c = f
    self.up, self.dec = nn.ModuleList(), nn.ModuleList()
    for level in range(len(self.features) - 2, -1, -1):
      f = self.features[level]
      self.up.append(conv(c, f, kernel=2, stride=2, transposed=True))
      self.dec.append(ResBlock(2 * f, f, cond_features))
      c = f

  def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    skips, h = [], x
    for level, block in enumerate(self.enc):
      if level > 0:
        h = self.down[level - 1](h)
      h = block(h, cond)
      skips.append(h)
    for i, level in enumerate(range(len(self.features) - 2, -1, -1)):
      h = self.dec[i](torch.cat([self.up[i](h), skips[level]], dim=1), cond)
    return h


def space_to_depth(x: torch.Tensor, f: int) -> torch.Tensor:
  """[B, C, X, Y, Z] -> [B, f^3 C, X/f, Y/f, Z/f] (lossless)."""
  b, c, nx, ny, nz = x.shape
  x = x.reshape(b, c, nx // f, f, ny // f, f, nz // f, f).permute(0, 3, 5, 7, 1, 2, 4, 6)
  return x.reshape(b, f ** 3 * c, nx // f, ny // f, nz // f)


def jacobian_determinant(d: torch.Tensor) -> torch.Tensor:
  """det(I + grad u) by central differences: d [B, 3, X, Y, Z] voxels -> [B, X, Y, Z]."""
  j = [[torch.gradient(d[:, a], dim=b + 1)[0] + (1.0 if a == b else 0.0) for b in range(3)]
       for a in range(3)]
  return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
          - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
          + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


class Generator(nn.Module):
  """baseline [B,1,X,Y,Z], years [B], covariates [B,E] -> velocity, displacement, prediction,
  jacobian (velocity in model-grid voxels per year on the coarse grid)."""

  def __init__(self, cond_dim: int, features: Sequence[int] = (16, 32, 64),
               cond_features: int = 64, downsize: int = 2, num_squarings: int = 7,
               max_velocity: float = 2.0):
    super().__init__()
    self.downsize, self.max_velocity = downsize, max_velocity
    self.cond_in = nn.Linear(cond_dim, cond_features)
    self.cond_out = nn.Linear(cond_features, cond_features)
    self.unet = UNet(downsize ** 3, features, cond_features)
    self.velocity_head = conv(features[0], 3)
    nn.init.normal_(self.velocity_head.conv.weight, std=1e-5)
    nn.init.zeros_(self.velocity_head.conv.bias)
    self.integrate = blocks.DVF2DDF(num_squarings, mode='bilinear', padding_mode='border')
    self.warp = blocks.Warp(mode='bilinear', padding_mode='border')

  def velocity(self, baseline: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    cond = F.silu(self.cond_out(F.silu(self.cond_in(cov))))
    v = self.velocity_head(self.unet(space_to_depth(baseline, self.downsize), cond))
    return self.max_velocity * torch.tanh(v / self.max_velocity)

  def forward(self, baseline, years, cov) -> dict[str, torch.Tensor]:
    v = self.velocity(baseline, cov)
    f = self.downsize
    coarse = self.integrate(v * (years / f)[:, None, None, None, None])
    d = F.interpolate(coarse, scale_factor=f, mode='trilinear', align_corners=False) * f
    return {'velocity': v, 'displacement': d, 'prediction': self.warp(baseline, d),
            'jacobian': jacobian_determinant(d)}


def load_flax_params(model: Generator, params) -> None:
  """Copies a `ProgressionGenerator` params tree (numpy/jax arrays) into `model`.

  Kernels [kx, ky, kz, Cin, Cout] -> [Cout, Cin, kx, ky, kz]; transposed kernels are
  flipped (flax applies them flipped) and stored [Cin, Cout, ...]; Dense [in, out] ->
  Linear [out, in]. Lets a test check that both models compute the same function.
  """
  t = lambda a: torch.as_tensor(np.array(a, dtype=np.float32))

  def put(module: nn.Module, p: dict, kind: str = 'conv') -> None:
    if kind == 'dense':
      weight = t(p['kernel']).T
    elif kind == 'transposed':
      weight = t(p['kernel']).flip(0, 1, 2).permute(3, 4, 0, 1, 2)
    else:
      kernel = t(p['kernel'])
      weight = (kernel.reshape(1, 1, 1, *kernel.shape) if kernel.ndim == 2 else kernel
                ).permute(4, 3, 0, 1, 2)
    target = module.conv if hasattr(module, 'conv') else module
    with torch.no_grad():
      target.weight.copy_(weight)
      target.bias.copy_(t(p['bias']))

  def put_block(block: ResBlock, p: dict) -> None:
    put(block.conv1, p['conv1'])
    put(block.conv2, p['conv2'])
    put(block.film, p['film'], 'dense')
    for name in ('norm1', 'norm2'):
      with torch.no_grad():
        getattr(block, name).weight.copy_(t(p[name]['scale']))
        getattr(block, name).bias.copy_(t(p[name]['bias']))
    if 'skip' in p:
      put(block.skip, p['skip'])

  put(model.cond_in, params['cond_in'], 'dense')
  put(model.cond_out, params['cond_out'], 'dense')
  put(model.velocity_head, params['velocity_head'])
  u, levels = params['unet'], len(model.unet.features)
  for level in range(levels):
    put_block(model.unet.enc[level], u[f'enc{level}'])
    if level > 0:
      put(model.unet.down[level - 1], u[f'down{level}'])
  for i, level in enumerate(range(levels - 2, -1, -1)):
    put(model.unet.up[i], u[f'up{level}'], 'transposed')
    put_block(model.unet.dec[i], u[f'dec{level}'])


def total_loss(out: dict, batch: dict, weights: dict[str, float], warp: nn.Module
               ) -> torch.Tensor:
  """Batch mean of the weighted terms of `progression.losses.total_loss`: image MSE, velocity
  smoothness (mean squared forward difference, averaged over the 3 axes), soft Dice of the
  warped one-hot baseline labels over the classes present (background excluded), the
  squared log ratio of warped to real label volumes and the Jacobian folding penalty. NCC
  is not mirrored (off in the default config)."""
  if weights.get('ncc', 0.0):
    raise ValueError('the PyTorch reference does not implement the NCC loss')
  reduce = lambda a: a.flatten(1).mean(1)
  loss = weights['image'] * reduce((out['prediction'] - batch['followup']) ** 2)
  v = out['velocity']
  loss = loss + weights['smoothness'] * sum(reduce(torch.diff(v, dim=a) ** 2)
                                            for a in (2, 3, 4)) / 3.0
  loss = loss + weights['folding'] * reduce(F.relu(-out['jacobian']))
  if weights.get('dice', 0.0) or weights.get('volume', 0.0):
    onehot = lambda l: F.one_hot(l.long(), NUM_CLASSES).permute(0, 4, 1, 2, 3).float()
    warped = warp(onehot(batch['baseline_labels']), out['displacement'])[:, 1:]
    target = onehot(batch['followup_labels'])[:, 1:]
    warped_mass, target_mass = warped.flatten(2).sum(2), target.flatten(2).sum(2)
  if weights.get('dice', 0.0):
    inter = (warped * target).flatten(2).sum(2)
    total = warped_mass + target_mass
    present = (total > 1e-6).float()
    dice = (2 * inter / total.clamp_min(1e-6) * present).sum(1) / present.sum(1).clamp_min(1.0)
    loss = loss + weights['dice'] * torch.where(present.sum(1) > 0, 1.0 - dice, 0.0)
  if weights.get('volume', 0.0):
    present = (target_mass > 0).float()
    ratio = torch.log((warped_mass + 2.0) / (target_mass + 2.0))
    error = (present * ratio ** 2).sum(1) / present.sum(1).clamp_min(1.0)
    loss = loss + weights['volume'] * error
  return loss.mean()


def random_batch(size: Sequence[int], batch: int, cond_dim: int, seed: int = 0) -> dict:
  """Inputs shaped as `progression.input_pipeline` batches (channels first)."""
  g = torch.Generator().manual_seed(seed)
  labels = lambda: torch.randint(0, NUM_CLASSES, (batch, *size), generator=g, dtype=torch.uint8)
  return {'baseline': torch.rand(batch, 1, *size, generator=g),
          'followup': torch.rand(batch, 1, *size, generator=g),
          'years': torch.rand(batch, generator=g) * 3 + 0.5,
          'covariates': torch.randn(batch, cond_dim, generator=g),
          'baseline_labels': labels(), 'followup_labels': labels()}


def benchmark(size: Sequence[int], *, cond_dim: int, loss_weights: dict[str, float],
              features: Sequence[int] = (16, 32, 64), batch: int = 1, repetitions: int = 5,
              warmup: int = 1, threads: int = 2, learning_rate: float = 1e-3,
              weight_decay: float = 1e-4, grad_clip_norm: float = 1.0,
              measures: Sequence[str] = ()) -> dict:
  """Times the generator's forward (no loss) and training step (forward, losses, backward,
  clipping, AdamW), and the velocity network (covariate MLP + U-Net + head) forward and
  forward+backward (of mean(v^2)), at `size` voxels.

  Returns per measurement (all, or those named in `measures`) `{'first_call_s', 'median_s'
  (seconds per call), 'times_s', 'per_sample_s'}`, plus 'params', 'batch', 'threads'.
  """
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = Generator(cond_dim, features)
  data = random_batch(size, batch, cond_dim)
  opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)

  def forward():
    with torch.inference_mode():
      model(data['baseline'], data['years'], data['covariates'])

  def train_step():
    opt.zero_grad(set_to_none=True)
    loss = total_loss(model(data['baseline'], data['years'], data['covariates']), data,
                      loss_weights, model.warp)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    opt.step()

  def velocity_forward():
    with torch.inference_mode():
      model.velocity(data['baseline'], data['covariates'])

  def velocity_backward():
    model.zero_grad(set_to_none=True)
    model.velocity(data['baseline'], data['covariates']).square().mean().backward()

  result = {'params': sum(p.numel() for p in model.parameters()), 'batch': batch,
            'threads': torch.get_num_threads()}
  for name, fn in (('forward', forward), ('train_step', train_step),
                   ('velocity_forward', velocity_forward),
                   ('velocity_forward_backward', velocity_backward)):
    if measures and name not in measures:
      continue
    result[name] = time_calls(fn, repetitions, warmup)
    result[name]['per_sample_s'] = result[name]['median_s'] / batch
  return result


def parse_size(text: str) -> tuple[int, int, int]:
  """'64' -> (64, 64, 64); '120x144x120' -> (120, 144, 120)."""
  parts = [int(p) for p in text.lower().split('x')]
  return tuple(parts * 3) if len(parts) == 1 else tuple(parts)


def main(argv):
  del argv
  import monai  # For its version; the blocks are imported above.
  opts = flags.FLAGS
  results = {'torch': torch.__version__, 'monai': monai.__version__, 'runs': []}
  for text in opts.sizes:
    size = parse_size(text)
    for batch in opts.batches:
      run = benchmark(size, cond_dim=opts.cond_dim, loss_weights=json.loads(opts.loss_weights),
                      features=[int(c) for c in opts.features], batch=int(batch),
                      repetitions=opts.repetitions, warmup=opts.warmup, threads=opts.threads,
                      measures=[m for m in opts.measures if m])
      results['runs'].append({'size': 'x'.join(map(str, size)), **run})
  results['maxrss_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  text = json.dumps(results, indent=1)
  if opts.out:
    with open(opts.out, 'w') as out:
      out.write(text)
  else:
    print(text)


def define_flags() -> None:
  """Command-line flags, defined only when run as a script (so that tests can import this
  module next to experiments.benchmark, whose flags share names)."""
  flags.DEFINE_list('sizes', ['64'], 'Grids, e.g. 32,64,120x144x120 (voxels).')
  flags.DEFINE_list('batches', ['1', '2'], 'Batch sizes (PyTorch picks its oneDNN '
                    'convolution only for some shapes, e.g. batch > 1).')
  flags.DEFINE_integer('repetitions', 5, 'Timed calls per measurement.')
  flags.DEFINE_integer('warmup', 1, 'Untimed calls before timing.')
  flags.DEFINE_integer('threads', 2, 'torch.set_num_threads.')
  flags.DEFINE_integer('cond_dim', 16, 'Width of the conditioning input (encoded covariates, '
                       'plus the regional prior\'s rates when the model is anchored on it).')
  flags.DEFINE_list('features', ['16', '32', '64'], 'U-Net channels per level.')
  flags.DEFINE_string('loss_weights', '{"image": 1.0, "smoothness": 0.01, '
                      '"dice": 0.1, "folding": 1.0}', 'Loss weights as JSON.')
  flags.DEFINE_list('measures', [], 'Only these of forward, train_step, velocity_forward, '
                    'velocity_forward_backward (empty: all).')
  flags.DEFINE_string('out', None, 'Write the results here as JSON.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
