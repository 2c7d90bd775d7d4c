"""The wheel and sdist: built with `python -m build`, installed into a fresh venv, they hold our three packages only,
and install beside an existing torch 2.13.0 without replacing it.

To stay fast and offline the fresh venv borrows the already installed dependencies (torch, zmq, ...)
through a .pth line naming this environment's site-packages; a .pth line only adds a directory, it does
not run that directory's own .pth files, so the editable install of the checkout stays inactive and
our code can only come from the wheel (checked: every module's file lies in the fresh venv).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERIC = ("train", "model", "configurator", "corpus")
pytestmark = pytest.mark.timeout(300)


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 180) -> str:
    """Run `cmd`; its stdout, or the test fails with both streams."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The wheel and the sdist, built by `python -m build` from a copy of the checkout (the build writes
    build/ and egg-info next to the sources)."""
    src = tmp_path_factory.mktemp("src")
    for path in ROOT.iterdir():
        if path.is_file() and path.suffix in (".py", ".toml", ".md", ".sh"):
            shutil.copy2(path, src / path.name)  # train.py & co. are there: the build must leave them out
    for pkg in ("protocol", "trainer_hook", "analysis_daemon"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    # No build isolation: the setuptools of this environment builds it, nothing is fetched.
    run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), "."], src)
    (built,) = out.glob("embedding_monitor-*.whl")
    (sdist,) = out.glob("embedding_monitor-*.tar.gz")
    return {"wheel": built, "sdist": sdist}


@pytest.fixture(scope="module")
def wheel(dists: dict[str, Path]) -> Path:
    """The wheel `python -m build` made."""
    return dists["wheel"]


def test_wheel_holds_only_our_packages(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"protocol", "trainer_hook", "analysis_daemon"}
    assert "analysis_daemon/sinks/wandb_sink.py" in names and "trainer_hook/hf.py" in names
    assert "trainer_hook/lightning.py" in names
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Provides-Extra: hf" in text and "Provides-Extra: lightning" in text
    assert 'Requires-Dist: transformers>=4.41; extra == "hf"' in text
    assert "Provides-Extra: tensorboard" in text and "Provides-Extra: pandas" in text
    assert 'Requires-Dist: tensorboard>=2.14; extra == "tensorboard"' in text
    assert "analysis_daemon/sinks/tensorboard_sink.py" in names and "analysis_daemon/results_frame.py" in names


def test_fresh_venv_from_the_wheel_runs_the_cli_and_imports_the_callbacks(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    py = venv / "bin" / "python"
    site = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)], tmp_path)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    help_text = run([str(venv / "bin" / "analysis-daemon"), "--help"], tmp_path, env)
    assert "--listen" in help_text and "--results-dir" in help_text
    probe = ("import importlib.util, trainer_hook, trainer_hook.hf, trainer_hook.lightning, analysis_daemon, protocol\n"
             "from trainer_hook.hf import EmbeddingMonitorCallback as H\n"
             "from trainer_hook.lightning import EmbeddingMonitorCallback as L\n"
             "import transformers, lightning.pytorch as pl\n"
             "assert issubclass(H, transformers.TrainerCallback) and issubclass(L, pl.Callback)\n"
             "for m in (trainer_hook, trainer_hook.hf, trainer_hook.lightning, analysis_daemon, protocol):\n"
             "    print(m.__file__)\n"
             f"print([n for n in {GENERIC!r} if importlib.util.find_spec(n) is not None])\n")
    lines = run([str(py), "-c", probe], tmp_path, env).splitlines()
    assert all(line.startswith(str(venv)) for line in lines[:-1]), lines  # from the wheel, not the checkout
    assert lines[-1] == "[]"  # no train / model / configurator / corpus anywhere on the path
    installed = {p.name for p in site.iterdir()}
    assert {"protocol", "trainer_hook", "analysis_daemon"} <= installed
    assert not installed & {f"{n}{ext}" for n in GENERIC for ext in (".py", "")}


def torch_only_site(target: Path) -> Path:
    """A directory that holds (as links) this environment's installed packages but not embedding-monitor:
    a fresh venv given it through a .pth line "already has" torch 2.13.0 and every other dependency."""
    here = Path(sysconfig.get_paths()["purelib"])
    target.mkdir()
    for entry in here.iterdir():
        name = entry.name.lower()
        if name.startswith(("embedding_monitor", "__editable__", "_embedding_monitor")) or name.endswith(".pth"):
            continue  # our own editable install: the venv must get us from the built file only
        (target / entry.name).symlink_to(entry)
    return target


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_wheel_and_sdist_install_beside_an_existing_torch_without_replacing_it(
        dists: dict[str, Path], tmp_path: Path, kind: str) -> None:
    started = time.monotonic()
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    py = venv / "bin" / "python"
    site = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    (site / "existing_environment.pth").write_text(str(torch_only_site(tmp_path / "existing")) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # which torch, without importing it (seconds on a loaded machine): its metadata and where it lies
    probe = "import importlib.metadata as m, importlib.util as u; print(m.version('torch'), u.find_spec('torch').origin)"
    before = run([str(py), "-c", probe], tmp_path, env).split()

    # With its dependencies resolved (not --no-deps) but no index: everything it needs must already be
    # there, torch included, and nothing may be replaced. The sdist is built by the venv's own setuptools.
    out = run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-index", "--no-build-isolation",
               str(dists[kind])], tmp_path, env)
    after = run([str(py), "-c", probe], tmp_path, env).split()
    assert after == before and before[0] == "2.13.0+cpu", (before, after)
    assert not any(p.name.startswith("torch") for p in site.iterdir()), "pip installed a torch into the venv"
    assert "Successfully installed embedding-monitor-0.1.0" in out and "torch" not in out.split("Successfully")[-1]

    help_text = run([str(venv / "bin" / "analysis-daemon"), "--help"], tmp_path, env)
    assert "--tensorboard DIR" in help_text and "--tensorboard-projector-keep" in help_text
    where = run([str(py), "-c", "import analysis_daemon.results_frame as m; print(m.__file__)"], tmp_path, env)
    assert where.startswith(str(site)), where  # from the built package, not the checkout
    print(f"{kind}: installed beside torch and ran --help in {time.monotonic() - started:.1f} s")
