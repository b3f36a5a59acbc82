"""One process of the two-process CPU training test (run by train_test.py, not by pytest).

usage: python tests/distributed_worker.py PORT PROCESS_ID COHORT_ROOT WORKDIR OUT_NPZ
"""

import sys

import jax
import numpy as np

from experiments.configs import tiny
from progression import parallel, train


def main(port: str, process_id: str, cohort_root: str, workdir: str, out: str) -> None:
  parallel.initialize_distributed(f'127.0.0.1:{port}', 2, int(process_id))
  config = tiny.get_config()
  config.cohort.root = cohort_root
  config.num_steps = 2
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 2
  state = train.train_and_evaluate(config, workdir)
  leaves = jax.tree_util.tree_leaves(state.params)
  np.savez(out, *[np.asarray(x) for x in leaves])


if __name__ == '__main__':
  main(*sys.argv[1:])
