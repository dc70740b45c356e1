"""Write SCRATCH/explorer_shot.ipynb: the tour's parameters, imports and training cells, then its Explore
cell (figures go to SCRATCH/figures, so nothing is written into the repository)."""
import sys
from pathlib import Path

import nbformat

root, scratch = Path(__file__).resolve().parents[2], Path(sys.argv[1])
tour = nbformat.read(root / "notebooks" / "00_tour.ipynb", as_version=4)
setup = tour.cells[2].source.replace('figures_dir = Path(figures_dir or config.FIGURES_DIR / "00_tour")',
                                     f'figures_dir = Path("{scratch / "figures"}")')
cells = [nbformat.v4.new_code_cell(tour.cells[1].source),
         nbformat.v4.new_code_cell("import os\nassert os.environ.get('STUDY_HEADLESS') != '1'\n" + setup),
         nbformat.v4.new_code_cell(tour.cells[6].source),
         nbformat.v4.new_code_cell('model, test = run["model"], run["splits"]["test"]'),
         nbformat.v4.new_code_cell(tour.cells[14].source)]
kernel = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": kernel}), scratch / "explorer_shot.ipynb")
