"""The notebooks run top to bottom in their small setting and are stored without outputs.

Each notebook asserts its own results (a loss that fell, a reward that rose, hand-computed
accuracies); an assertion or any other error in a cell fails the test with that cell's traceback.
The kernel is the test interpreter's own ('python3' kernels start `sys.executable`), on one CPU
device, with the notebooks' one switch set to the small setting.
"""

import os
import pathlib
import sys

import nbformat
import pytest

from xla_env import xla_flags

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'
NAMES = ['01_quickstart', '02_sft', '03_reward_and_dpo', '04_grpo', '05_evaluation']
# Appended to the in-memory copy only: which interpreter ran the cells.
PROBE = 'import sys\nprint(sys.prefix)'


def _read(name):
  return nbformat.read(NOTEBOOKS / f'{name}.ipynb', as_version=4)


def test_every_notebook_is_tested():
  assert sorted(p.stem for p in NOTEBOOKS.glob('*.ipynb')) == NAMES


@pytest.mark.parametrize('name', NAMES)
def test_notebook_is_stored_without_outputs(name):
  notebook = _read(name)
  nbformat.validate(notebook)
  for i, cell in enumerate(notebook.cells):
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, (
          f'{name}.ipynb cell {i} holds outputs; clear them before committing')


@pytest.mark.parametrize('name', NAMES)
def test_notebook_is_switched_by_one_parameter(name):
  sources = [cell.source for cell in _read(name).cells if cell.cell_type == 'code']
  assert "'google.colab' in sys.modules" in sources[0]  # the first cell only installs in Colab
  assert "SMALL = os.environ.get('JPOST_NOTEBOOK_SMALL'" in sources[1]


@pytest.mark.parametrize('name', NAMES)
def test_notebook_runs_in_its_small_setting(name, tmp_path):
  nbclient = pytest.importorskip('nbclient')
  notebook = _read(name)
  notebook.cells.append(nbformat.v4.new_code_cell(PROBE))
  env = {**os.environ, 'JPOST_NOTEBOOK_SMALL': '1', 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': xla_flags(1), 'TMPDIR': str(tmp_path),
         'MPLBACKEND': 'module://matplotlib_inline.backend_inline'}
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(NOTEBOOKS)}})
  client.execute(env=env)
  probe = ''.join(o.get('text', '') for o in notebook.cells[-1].outputs).strip()
  assert probe == sys.prefix, f'the kernel ran {probe}, not this interpreter ({sys.prefix})'
  # Work directories go to the temporary folder, never into the repository.
  assert any(tmp_path.glob('jpost_notebook_*'))
