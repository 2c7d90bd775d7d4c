"""The wheel: built with `pip wheel . --no-deps`, installed into a fresh venv, it holds our three packages only.

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
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the checkout (the build writes build/ and egg-info next to the sources)."""
    src = tmp_path_factory.mktemp("src")
    for path in ROOT.iterdir():
        if path.is_file() and path.suffix in (".py", ".toml", ".md", ".sh"):
            shutil.copy2(path, src / path.name)  # train.py & co. are there: the build must leave them out
    for pkg in ("protocol", "trainer_hook", "analysis_daemon"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheels")
    # No build isolation: the setuptools of this environment builds it, nothing is fetched.
    run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(out)], src)
    (built,) = out.glob("embedding_monitor-*.whl")
    return built


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
