"""Trains the progression generator. Intentionally short: the logic lives in progression.train.

  python -m experiments.train --config=experiments/configs/synthetic_small.py \
      --workdir=/tmp/w --config.cohort.root=/tmp/cohort [--config.num_steps=100]

Multi-host: start one process per host with --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (CPU hosts use gloo collectives).
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from progression import parallel, train

_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, metrics and cache.')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment configuration file.',
                                          lock_config=True)
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for multi-process training.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 1, 'Number of processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', 0, 'Index of this process.')
flags.mark_flags_as_required(['workdir', 'config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _NUM_PROCESSES.value > 1:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  common.log_devices()
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  common.run(main)
