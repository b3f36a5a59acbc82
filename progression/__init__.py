"""progression: forecast follow-up brain MRIs for Alzheimer's disease research with JAX/Flax."""

from progression.errors import ProgressionError

__all__ = ['ProgressionError']
__version__ = '0.1.0'
