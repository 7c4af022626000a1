"""`import pyroflows` is light, and a missing optional dependency names its extra."""

import subprocess
import sys

import pytest

from pyroflows._optional import EXTRAS, require

HEAVY = ["torchdiffeq", "arviz", "matplotlib", "sklearn", "scipy", "constriction"]


@pytest.fixture(scope="module")
def loaded() -> tuple[set[str], set[str]]:
    """Modules loaded by ``import pyroflows`` in a fresh interpreter, and then by a first use of
    ``pyroflows.transforms.planar`` (one subprocess: importing torch and Pyro takes seconds)."""
    code = (
        "import sys\nimport pyroflows\nprint(' '.join(sys.modules))\n"
        "import pyroflows.transforms as t\nassert callable(t.planar) and t.Planar.bijective\n"
        "print(' '.join(sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, then = out.stdout.splitlines()[-2:]
    return set(first.split()), set(then.split())


def test_import_pyroflows_loads_no_family_and_no_optional_dependency(loaded):
    modules = loaded[0]
    assert not {m for m in modules if m.split(".")[0] in HEAVY}
    ours = {m for m in modules if m.startswith("pyroflows.")}
    core = {
        "pyroflows.flow",
        "pyroflows.registry",
        "pyroflows.validation",
        "pyroflows.transforms",
        "pyroflows.transforms.base",
    }
    assert ours <= core, sorted(ours - core)


def test_transform_names_load_their_module_on_first_use(loaded):
    modules = loaded[1]
    assert "pyroflows.transforms.planar" in modules
    assert "pyroflows.transforms.cnf" not in modules and "torchdiffeq" not in modules


def test_a_function_is_not_hidden_by_its_module():
    # importing pyroflows.transforms.cnf binds the name `cnf` on the package: the function wins
    import pyroflows.transforms as t
    import pyroflows.transforms.radial  # noqa: F401

    assert callable(t.radial) and not isinstance(t.radial, type(sys))
    with pytest.raises(AttributeError, match="no_such_layer"):
        t.no_such_layer  # noqa: B018


def test_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(EXTRAS, "pyroflows_absent_pkg", "bench")  # certainly not installed
    with pytest.raises(ImportError, match=r'pip install "pyroflows\[bench\]"'):
        require("pyroflows_absent_pkg.sub")


def test_every_extra_in_the_table_is_declared_in_pyproject():
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path

    pyproject = Path(__file__).parent.parent / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS.values()) <= set(declared)


def test_core_works_without_the_optional_packages():
    # a fresh interpreter in which every optional package is missing, as after `pip install .`
    code = f"""
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {sorted(EXTRAS)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Missing())
import torch, pyroflows
import pyroflows.infer, pyroflows.guides, pyroflows.models, pyroflows.plotting
for name in pyroflows.available_flows():
    shape = (1, 4, 4) if not pyroflows.registry.family_spec(name).vector else 2
    try:
        pyroflows.build_flow(name, shape, num_layers=1, hidden_dims=(4,))
    except ImportError as err:
        print(name, err)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()  # only cnf needs an extra, and its error names it
    assert len(lines) == 1 and lines[0].startswith("cnf "), out.stdout
    assert 'pip install "pyroflows[cnf]"' in lines[0]
