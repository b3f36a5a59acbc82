"""Visit volumes measured once: kept in a JSON file, reused while the file measured is the
same, measured afresh when it changes, never written by a reader."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from progression import cohort, io
from progression import labels as L
from progression.errors import ProgressionError
from progression.evaluation import baselines, visit_volumes


def _pairs_on_copies(synthetic_cohort, tmp_path) -> pd.DataFrame:
  """The first subject's pairs, with its label maps copied under tmp_path (editable)."""
  _, pairs = cohort.load_cohort('synthetic', synthetic_cohort)
  pairs = pairs[pairs.subject == pairs.subject.iloc[0]].copy()
  for column in ('baseline_labels', 'followup_labels'):
    copies = []
    for source in pairs[column]:
      target = tmp_path / 'labels' / f'{abs(hash(str(source)))}.nii.gz'
      target.parent.mkdir(exist_ok=True)
      if not target.exists():
        shutil.copy(source, target)
      copies.append(str(target))
    pairs[column] = copies
  return pairs


def _refuse_to_measure(*args, **kwargs):
  raise AssertionError('a known visit was measured again')


def test_known_visits_are_reused_and_changed_files_measured_again(synthetic_cohort, tmp_path,
                                                                  monkeypatch):
  pairs = _pairs_on_copies(synthetic_cohort, tmp_path)
  store = tmp_path / 'workdir' / visit_volumes.FILE_NAME
  first = baselines.training_volume_table(pairs, 'labels',
                                          known=visit_volumes.VisitVolumes(store))
  visits = set(pairs.baseline_labels) | set(pairs.followup_labels)
  saved = json.loads(store.read_text())['visits']
  assert len(saved) == len(visits) and all(k.startswith('labels:') for k in saved)

  with monkeypatch.context() as patch:  # Everything known: nothing is measured.
    patch.setattr(baselines, 'measure_volumes_ml', _refuse_to_measure)
    again = baselines.training_volume_table(
        pairs, 'labels', known=visit_volumes.VisitVolumes(store, writable=False))
  pd.testing.assert_frame_equal(first, again)

  # A label map rewritten with its hippocampus erased is measured afresh; a reader does not
  # write what it measured.
  edited = pairs.baseline_labels.iloc[0]
  volume = io.load_labels(edited)
  data = np.where(np.isin(volume.data, L.REGIONS['hippocampus']), 0, volume.data)
  io.save_labels(edited, data, volume.affine)
  before = store.read_text()
  reread = baselines.training_volume_table(
      pairs, 'labels', known=visit_volumes.VisitVolumes(store, writable=False))
  hippocampus = reread[reread.region == 'hippocampus'].baseline_ml.to_numpy()
  was_edited = (pairs.baseline_labels == edited).to_numpy()
  assert (hippocampus[was_edited] == 0).all() and (hippocampus[~was_edited] > 0).all()
  assert was_edited.any() and not was_edited.all()
  assert store.read_text() == before


def test_an_unreadable_store_is_measured_again(synthetic_cohort, tmp_path):
  pairs = _pairs_on_copies(synthetic_cohort, tmp_path)
  store = tmp_path / visit_volumes.FILE_NAME
  store.write_text('{"visits": [truncated')
  table = baselines.training_volume_table(pairs, 'labels',
                                          known=visit_volumes.VisitVolumes(store))
  assert len(table) == len(pairs) * len(L.REGIONS)
  visits = set(pairs.baseline_labels) | set(pairs.followup_labels)
  assert len(json.loads(store.read_text())['visits']) == len(visits)  # Written afresh.


def test_a_missing_label_map_is_named():
  pairs = pd.DataFrame([{'subject': 's1', 'baseline_image': '/data/s1_t0.nii.gz',
                         'baseline_labels': None, 'followup_image': '/data/s1_t1.nii.gz',
                         'followup_labels': None, 'diagnosis': 'CN', 'age_years': 70.0,
                         'interval_years': 1.0}])
  with pytest.raises(ProgressionError,
                     match='s1_t0.nii.gz: volume method "labels" needs a label map'):
    baselines.training_volume_table(pairs, 'labels')
