"""Run notebooks headless with papermill: one notebook, or the whole study."""

from __future__ import annotations

import ast
import os
import uuid
from pathlib import Path

import nbclient
import nbformat
import papermill
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir
from papermill.exceptions import PapermillExecutionError
from tqdm import tqdm

from study import config


class IPCKernelManager(AsyncKernelManager):
    """Kernels on local IPC sockets instead of TCP: the kernels are local anyway, and ipykernel then
    does not warn about unencrypted TCP on every run."""

    def __init__(self, **kwargs):
        kwargs.setdefault("transport", "ipc")
        # a socket path of its own per kernel (the default, ./kernel-ipc-N, collides between concurrent
        # kernels and litters the working directory); jupyter_client removes the files at shutdown
        kwargs.setdefault("ip", str(Path(jupyter_runtime_dir()) / f"study-kernel-{uuid.uuid4().hex[:12]}"))
        Path(jupyter_runtime_dir()).mkdir(parents=True, exist_ok=True)
        super().__init__(**kwargs)


class UsageError(ValueError):
    """A bad request (unknown notebook, profile or parameter): exit code 2, nothing written."""


class NotebookFailed(RuntimeError):
    """A notebook raised while running: the message names the notebook and the failing cell."""


def find_notebook(name: str | Path, notebooks_dir: Path | None = None) -> Path:
    """Resolve a path or a bare name ('00_tour', '00_tour.ipynb') to a notebook file."""
    notebooks_dir = Path(notebooks_dir or config.NOTEBOOKS_DIR)
    candidates = [Path(name), notebooks_dir / name, notebooks_dir / f"{name}.ipynb"]
    for candidate in candidates:
        if candidate.suffix == ".ipynb" and candidate.is_file():
            return candidate.resolve()
    known = ", ".join(p.stem for p in list_notebooks(notebooks_dir))
    raise UsageError(f"unknown notebook {str(name)!r}; known notebooks: {known}")


def list_notebooks(notebooks_dir: Path | None = None) -> list[Path]:
    return sorted(Path(notebooks_dir or config.NOTEBOOKS_DIR).glob("[0-9][0-9]_*.ipynb"))


def parse_value(text: str):
    """Command-line values are Python literals when they parse as one (3, 1e-3, None, [1, 2]), else strings."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def declared_parameters(notebook: Path) -> dict:
    return papermill.inspect_notebook(str(notebook))


def check_parameters(notebook: Path, parameters: dict) -> None:
    declared = declared_parameters(notebook)
    if not declared:
        raise UsageError(f"{notebook.name} has no cell tagged 'parameters'")
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise UsageError(f"{notebook.name} does not declare parameter(s) {unknown}; it declares {sorted(declared)}")
    if "profile" in parameters:
        try:
            config.check_profile(parameters["profile"])
        except ValueError as error:
            raise UsageError(str(error)) from None


def default_figures_dir(notebook: Path, profile: str, runs_dir: Path) -> Path:
    """The default profile regenerates figures/; any other profile writes beside its runs."""
    if profile == "quick":
        return config.FIGURES_DIR / notebook.stem
    return runs_dir / "figures" / notebook.stem


def run_notebook(
    name: str | Path,
    parameters: dict | None = None,
    runs_dir: Path | None = None,
    progress: bool = True,
) -> Path:
    """Execute one notebook with papermill; return the executed copy's path.

    The executed copy goes to `runs_dir` (default runs/<profile>/) under a temporary name and is
    renamed when the run succeeds; a failing run leaves `<name>.failed.ipynb` and raises
    NotebookFailed naming the cell.
    """
    notebook = find_notebook(name)
    parameters = dict(parameters or {})
    check_parameters(notebook, parameters)
    profile = parameters.get("profile", declared_default(notebook, "profile"))
    runs_dir = Path(runs_dir or config.RUNS_DIR / profile).resolve()  # the kernel runs in notebooks/: no relative paths
    if "figures_dir" in declared_parameters(notebook):
        parameters.setdefault("figures_dir", str(default_figures_dir(notebook, profile, runs_dir)))
    for name in ("figures_dir", "data_root"):
        if isinstance(parameters.get(name), str):  # relative to where the user stands, not to notebooks/
            parameters[name] = str(Path(parameters[name]).resolve())
    runs_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("STUDY_PROGRESS", "0")  # no bars inside executed copies (the kernel inherits it)
    os.environ.setdefault("STUDY_HEADLESS", "1")  # no widgets either (study.explore.headless)
    final = runs_dir / notebook.name
    partial = runs_dir / f".{notebook.stem}.partial.ipynb"
    try:
        papermill.execute_notebook(
            str(notebook), str(partial), parameters=parameters, cwd=str(notebook.parent),
            progress_bar=progress, log_output=False, kernel_name="python3", kernel_manager_class=IPCKernelManager,
        )
    except PapermillExecutionError as error:
        failed = runs_dir / f"{notebook.stem}.failed.ipynb"
        os.replace(partial, failed)
        raise NotebookFailed(
            f"{notebook.name} failed in the cell with execution count {error.exec_count}:\n"
            f"{_failing_cell_source(failed)}\n{error.ename}: {error.evalue}\nexecuted copy: {failed}"
        ) from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, final)
    return final


def _failing_cell_source(executed: Path) -> str:
    """The source of the cell whose output is an error (papermill adds banner cells, so no index)."""
    for cell in nbformat.read(executed, as_version=4).cells:
        if any(output.get("output_type") == "error" for output in cell.get("outputs", [])):
            lines = cell.source.splitlines()
            return "\n".join(f"    {line}" for line in lines[:8]) + ("\n    ..." if len(lines) > 8 else "")
    return "    (cell source unavailable)"


def declared_default(notebook: Path, name: str):
    declared = declared_parameters(notebook)
    if name not in declared:
        return "quick"
    return parse_value(declared[name]["default"])


def reproduce(profile: str = "quick", only: list[str] | None = None, runs_dir: Path | None = None) -> list[Path]:
    """Run every notebook (or those named in `only`) at `profile`; stop at the first failure."""
    try:
        config.check_profile(profile)
    except ValueError as error:
        raise UsageError(str(error)) from None
    notebooks = [find_notebook(n) for n in only] if only else list_notebooks()
    for notebook in notebooks:
        check_parameters(notebook, {"profile": profile})
    outputs = []
    bar = tqdm(notebooks, desc="notebooks", unit="nb")
    for notebook in bar:
        bar.set_postfix_str(notebook.stem)
        outputs.append(run_notebook(notebook, {"profile": profile}, runs_dir=runs_dir))
    return outputs


def refresh_notebook(name: str | Path, timeout: int = 1800) -> Path:
    """Re-execute a committed notebook in place at its default parameters, with clean metadata.

    This is how the committed outputs are produced: by the notebook's own code, nothing pasted.
    """
    notebook = find_notebook(name)
    os.environ.setdefault("STUDY_PROGRESS", "0")
    os.environ.setdefault("STUDY_HEADLESS", "1")
    nb = nbformat.read(notebook, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": str(notebook.parent)}},
        kernel_manager_class=IPCKernelManager,
    )
    client.execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nb.metadata = nbformat.NotebookNode(
        kernelspec={"display_name": "Python 3", "language": "python", "name": "python3"},
        language_info={"name": "python"},
    )
    tmp = notebook.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, notebook)
    return notebook
