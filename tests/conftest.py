"""Test setup: two forced CPU devices (before jax is imported) and shared fixtures."""

import os
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Persistent compilation cache: the subprocess tests (CLI, kill -9, two processes) compile
# the same programs again; reading them from disk keeps the suite within CI's budget.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), f'progression-jax-cache-{os.getuid()}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import pytest

# Tiny-but-real settings shared by the end-to-end tests (cohort at 32^3, 4 mm voxels).
COHORT_SUBJECTS = 12
COHORT_SHAPE = (32, 32, 32)
COHORT_VOXEL_MM = 4.0


@pytest.fixture(scope='session')
def synthetic_cohort(tmp_path_factory):
  """A 12-subject x 3-visit synthetic cohort, made once per test session (read-only!)."""
  from progression import synthetic
  root = tmp_path_factory.mktemp('cohort') / 'synthetic'
  return synthetic.make_cohort(root, n_subjects=COHORT_SUBJECTS, shape=COHORT_SHAPE,
                               voxel_mm=COHORT_VOXEL_MM, n_visits=3, seed=0)


def random_normal(shape, seed=0):
  """A float32 standard-normal array of `shape`, the same for the same `seed`."""
  import jax
  import jax.numpy as jnp
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def skip_unless_available(impl):
  """Skips the calling test when it asks for impl 'compiled' and this machine cannot build
  the compiled kernels (no C++ compiler), naming the reason."""
  from progression.models import conv_kernels
  if impl == 'compiled' and not conv_kernels.available():
    pytest.skip(conv_kernels.unavailable_reason())


def tiny_config(cohort_root, **overrides):
  """experiments/configs/tiny.py pointed at `cohort_root`, with dotted-key overrides."""
  from experiments.configs import tiny
  config = tiny.get_config()
  config.cohort.root = str(cohort_root)
  for key, value in overrides.items():
    target = config
    *path, leaf = key.split('.')
    for part in path:
      target = target[part]
    target[leaf] = value
  return config


@pytest.fixture(scope='session')
def trained_workdir(synthetic_cohort, tmp_path_factory):
  """A workdir with a tiny generator trained 6 steps on `synthetic_cohort` (read-only!)."""
  from progression import train
  workdir = tmp_path_factory.mktemp('trained')
  train.train_and_evaluate(tiny_config(synthetic_cohort), workdir)
  return workdir


def restore_train_state(checkpoint_folder):
  """The latest TrainState saved in a `checkpoints/` folder, built from its own config."""
  import jax
  import ml_collections
  from progression import checkpoints, train
  checkpointer = checkpoints.Checkpointer(checkpoint_folder, read_only=True)
  try:
    metadata = checkpointer.restore_metadata()
    template = train.create_train_state(ml_collections.ConfigDict(metadata['config']),
                                        jax.random.PRNGKey(0))
    state, _ = checkpointer.restore(template)
  finally:
    checkpointer.close()
  return state
