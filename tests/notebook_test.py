"""notebooks/forecast_single_subject.ipynb runs top to bottom on the tiny test cohort."""

import json
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / 'notebooks' / 'forecast_single_subject.ipynb'


def test_notebook_is_committed_without_outputs():
  cells = json.loads(NOTEBOOK.read_text())['cells']
  code = [c for c in cells if c['cell_type'] == 'code']
  assert code and all(c['outputs'] == [] and c['execution_count'] is None for c in code)
  assert 'output_type' not in NOTEBOOK.read_text()


def test_notebook_runs_and_draws_figures(synthetic_cohort, trained_workdir, tmp_path,
                                         monkeypatch):
  monkeypatch.setenv('PROGRESSION_NOTEBOOK_WORKDIR', str(trained_workdir))
  monkeypatch.setenv('PROGRESSION_NOTEBOOK_COHORT', str(synthetic_cohort))
  monkeypatch.setenv('PROGRESSION_NOTEBOOK_FALLBACK_DIR', str(tmp_path / 'unused'))
  monkeypatch.delenv('MPLBACKEND', raising=False)  # The kernel's inline backend draws PNGs.
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(notebook, timeout=240, kernel_name='python3',
                 resources={'metadata': {'path': str(tmp_path)}}).execute()

  outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  pngs = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(pngs) >= 4  # Slices, Jacobian overlay, trajectories, counterfactual.
  text = ''.join(o.get('text', '') for o in outputs)
  assert f'Using the trained model in {trained_workdir}' in text
  assert not (tmp_path / 'unused').exists()
  assert os.listdir(tmp_path) == []  # Nothing written beside the notebook's working folder.
