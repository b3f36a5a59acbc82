"""Op time by kind: the HLO classification and the profile of a known program."""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from experiments import op_profile


def _conv_then_transpose(x, w):
  y = lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return jnp.tanh(y).transpose(3, 1, 2, 0)


def _compiled():
  x, w = jnp.ones((2, 32, 32, 16)), jnp.ones((3, 3, 16, 16))
  return jax.jit(_conv_then_transpose).lower(x, w).compile(), (x, w)


def test_instruction_kinds_of_a_conv_and_a_transpose():
  compiled, _ = _compiled()
  kinds = op_profile.instruction_kinds(compiled.as_text())
  entry = compiled.as_text().split('ENTRY')[1]
  top = {name: kind for name, kind in kinds.items() if f'%{name} = ' in entry}
  # Whatever XLA names them (a plain convolution or a library fusion), the program is one
  # convolution op and one transposing op, plus its parameters.
  assert sorted(k for k in top.values() if k != 'other') == ['convolution', 'layout'], top
  assert op_profile._kind('fusion', '%c = f32[2] add(%a, %b)') == 'other'
  assert op_profile._kind('dot', '') == 'convolution'
  assert op_profile._kind('copy', '') == 'layout'


def test_op_time_by_kind_of_a_known_program():
  compiled, args = _compiled()
  call = lambda: jax.block_until_ready(compiled(*args))
  call()
  ops = op_profile.op_time_by_kind(compiled, call, calls=2)
  assert ops['convolution'] > 0 and ops['layout'] > 0
  assert ops['total'] == pytest.approx(ops['convolution'] + ops['layout'] + ops['other'])
  assert sum(ops[f'share_{k}'] for k in op_profile.KINDS) == pytest.approx(1.0)


def test_our_compiled_kernels_count_as_convolution():
  from progression.models import conv_kernels, layers
  if not conv_kernels.available():
    pytest.skip(conv_kernels.unavailable_reason())
  x, k = jnp.ones((1, 6, 6, 6, 8)), jnp.ones((3, 3, 3, 8, 16))
  grad = jax.grad(lambda k: jnp.sum(layers.conv3x3x3(x, k, 'compiled') ** 2))
  kinds = op_profile.instruction_kinds(jax.jit(grad).lower(k).compile().as_text())
  calls = [name for name in kinds if name.startswith('ffi_call')]
  assert len(calls) == 2 and all(kinds[name] == 'convolution' for name in calls), kinds
  assert op_profile._kind('custom-call', '', 'custom_call_target="other_library"') == 'other'
