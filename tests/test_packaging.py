"""The installed layout (pyproject.toml): the kernels/ folder is installed as
ambient_dist.kernels, never as a top-level `kernels` (a PyPI project of that name exists),
and every package folder is listed (a mapped folder is invisible to packages.find)."""
import importlib
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def setuptools_table() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_kernels_folder_is_installed_under_ambient_dist():
    tool = setuptools_table()
    assert tool["package-dir"] == {"ambient_dist.kernels": "kernels"}
    assert "ambient_dist.kernels" in tool["packages"]
    assert all(p.split(".")[0] == "ambient_dist" for p in tool["packages"]), tool["packages"]
    # The CUDA sources ship as the data-only package ambient_dist.kernels.cuda (listed, so that
    # setuptools neither drops nor warns about the folder).
    assert set(tool["package-data"]["ambient_dist.kernels.cuda"]) == {"*.cu", "*.cpp", "*.h"}
    for pattern in tool["package-data"]["ambient_dist.kernels.cuda"]:
        assert list((REPO / "kernels" / "cuda").glob(pattern)), pattern


def test_every_package_folder_is_listed():
    folders = {"ambient_dist." + ".".join(p.parent.relative_to(REPO / "ambient_dist").parts)
               for p in (REPO / "ambient_dist").rglob("__init__.py")}
    folders = {f.rstrip(".") for f in folders} | {"ambient_dist.kernels", "ambient_dist.kernels.cuda"}
    folders |= {"ambient_dist.kernels." + ".".join(p.parent.relative_to(REPO / "kernels").parts)
                for p in (REPO / "kernels").rglob("__init__.py") if p.parent != REPO / "kernels"}
    assert set(setuptools_table()["packages"]) == folders


def test_ambient_dist_kernels_is_the_kernels_folder():
    kernels = importlib.import_module("ambient_dist.kernels")
    assert Path(kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"
    assert importlib.import_module("ambient_dist.kernels.philox").PhiloxNoise is kernels.PhiloxNoise
