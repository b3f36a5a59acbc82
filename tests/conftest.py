"""Test setup: two forced CPU devices (before jax is imported) and shared fixtures."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
