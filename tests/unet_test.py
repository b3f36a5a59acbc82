"""U-Net and ResBlock: shapes, FiLM identity at init, impl equivalence, known answers."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from progression.errors import ProgressionError
from progression.models import unet
from tests.conftest import random_normal as _x

FEATURES = (4, 8, 16)


@pytest.fixture(scope='module')
def model_and_params():
  m = unet.UNet(FEATURES)
  x, cond = _x((2, 8, 8, 8, 3)), _x((2, 5), 1)
  return m, m.init(jax.random.PRNGKey(0), x, cond), x, cond


def test_output_shape_and_param_layout(model_and_params):
  m, params, x, cond = model_and_params
  out = jax.jit(m.apply)(params, x, cond)
  assert out.shape == (2, 8, 8, 8, FEATURES[0])
  p = params['params']
  assert set(p) == {'enc0', 'enc1', 'enc2', 'down1', 'down2', 'up0', 'up1', 'dec0', 'dec1'}
  assert p['enc1']['conv1']['kernel'].shape == (3, 3, 3, 8, 8)
  assert p['down1']['kernel'].shape == (2, 2, 2, 4, 8)
  assert p['up0']['kernel'].shape == (2, 2, 2, 8, 4)
  assert p['dec0']['conv1']['kernel'].shape == (3, 3, 3, 8, 4)  # concat(up 4, skip 4)
  assert p['dec0']['skip']['kernel'].shape == (8, 4)  # 1x1x1 projection 8 -> 4
  assert 'skip' not in p['enc1']  # same channels: identity skip
  assert unet.count_params(params) == sum(a.size for a in jax.tree.leaves(params))


def test_film_starts_as_identity_then_conditions(model_and_params):
  m, params, x, cond = model_and_params
  apply = jax.jit(m.apply)
  np.testing.assert_array_equal(apply(params, x, cond), apply(params, x, 10.0 * cond + 1.0))
  np.testing.assert_array_equal(apply(params, x, cond), apply(params, x, None))
  perturbed = jax.tree_util.tree_map_with_path(
      lambda path, v: v + 0.1 if 'film' in jax.tree_util.keystr(path) else v, params)
  assert not np.allclose(apply(perturbed, x, cond), apply(perturbed, x, 10.0 * cond + 1.0))


def test_depth_taps_and_native_agree(model_and_params):
  _, params, x, cond = model_and_params
  a = unet.UNet(FEATURES, conv_impl='depth_taps').apply(params, x, cond)
  b = unet.UNet(FEATURES, conv_impl='native').apply(params, x, cond)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_resblock_with_zero_convs_is_identity():
  x = _x((1, 4, 4, 4, 6))
  block = unet.ResBlock(6)
  params = block.init(jax.random.PRNGKey(0), x, None)
  zeroed = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.zeros_like(v) if 'conv' in jax.tree_util.keystr(path) else v, params)
  # conv -> 0, GroupNorm(0) -> 0, SiLU(0) = 0: only the identity skip remains.
  np.testing.assert_allclose(block.apply(zeroed, x, None), x, atol=1e-6)


def test_gradients_reach_every_parameter(model_and_params):
  m, params, x, cond = model_and_params
  perturbed = jax.tree.map(lambda v: v + 0.01, params)  # FiLM kernels are 0 at init
  grads = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(m.apply(p, x, cond)))))(perturbed)
  flat = flax.traverse_util.flatten_dict(grads['params'])
  dead = [k for k, g in flat.items() if not np.any(np.asarray(g))]
  assert not dead, dead


def test_bfloat16_compute_keeps_float32_params(model_and_params):
  _, params, x, cond = model_and_params
  out = unet.UNet(FEATURES, dtype=jnp.bfloat16).apply(params, x, cond)
  assert out.dtype == jnp.bfloat16
  ref = unet.UNet(FEATURES).apply(params, x, cond)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.1, rtol=0.1)


def test_indivisible_size_is_a_clear_error(model_and_params):
  m, params, _, cond = model_and_params
  with pytest.raises(ProgressionError, match='divisible by 4'):
    m.apply(params, _x((2, 8, 6, 8, 3)), cond)
  with pytest.raises(ProgressionError, match='batch, x, y, z'):
    m.apply(params, _x((8, 8, 8, 3)), cond)


def test_num_groups_for():
  assert unet.num_groups_for(16) == 8
  assert unet.num_groups_for(12) == 6
  assert unet.num_groups_for(3) == 3
  assert unet.num_groups_for(7) == 7
  assert unet.num_groups_for(9) == 3


def test_additive_skips():
  x, cond = _x((1, 4, 4, 4, 3)), _x((1, 5), 1)
  m = unet.UNet((4, 8), skip='add')
  params = m.init(jax.random.PRNGKey(0), x, cond)
  assert params['params']['dec0']['conv1']['kernel'].shape == (3, 3, 3, 4, 4)
  assert 'skip' not in params['params']['dec0']
  assert m.apply(params, x, cond).shape == (1, 4, 4, 4, 4)
  with pytest.raises(ProgressionError, match="'concat' or 'add'"):
    unet.UNet((4, 8), skip='sum').init(jax.random.PRNGKey(0), x, cond)
