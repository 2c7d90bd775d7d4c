"""The manual cannot drift from the code: the CLI reference covers every option, the examples run.

- every long option that `analysis-daemon [SUBCOMMAND] --help` prints (through cli.main) appears in the
  reference that docs/hooks/cli_reference.py generates for the site, and every subcommand is dispatched;
- every page under docs/ is in mkdocs.yml's nav and every nav entry exists (the strict build checks this
  too, but it runs after the tests and needs the doc tools);
- the code examples of Getting started and Integrations are files in docs/snippets/ that the pages include:
  each is run here as a user would run it (python, torchrun) against one real daemon, and its results read back.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_daemon import DaemonProc, wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SNIPPETS = DOCS / "snippets"

pytestmark = pytest.mark.timeout(300)


def cli_reference_module():
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "hooks" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def help_text(capsys, *args: str) -> str:
    """What `analysis-daemon ARGS --help` prints, through the command's real entry point."""
    from analysis_daemon.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_every_long_option_of_every_command_is_in_the_cli_reference(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    from analysis_daemon.cli import SUBCOMMANDS

    reference = cli_reference_module().reference_markdown()
    assert set(SUBCOMMANDS) >= {"keygen", "report", "replay"}
    for command in [(), *((name,) for name in SUBCOMMANDS)]:
        text = help_text(capsys, *command)
        assert text.startswith(f"usage: {' '.join(('analysis-daemon', *command))}"), text[:200]
        options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
        assert "--help" in options and len(options) > 1, command
        heading = f"## `{' '.join(('analysis-daemon', *command))}`"
        assert heading in reference, heading
        section = reference.split(heading, 1)[1].split("\n## ", 1)[0]
        missing = sorted(o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", section))
        assert not missing, f"{heading}: options missing from the generated reference: {missing}"


def test_the_reference_hook_fills_only_the_cli_page_and_insists_on_its_marker():
    hook = cli_reference_module()

    class Page:
        def __init__(self, uri: str) -> None:
            self.file = type("F", (), {"src_uri": uri})()

    cli_page = (DOCS / "cli.md").read_text()
    filled = hook.on_page_markdown(cli_page, Page("cli.md"), None, None)
    assert hook.MARKER not in filled and "## `analysis-daemon replay`" in filled and "--sample-rows" in filled
    assert hook.on_page_markdown("text " + hook.MARKER, Page("index.md"), None, None) == "text " + hook.MARKER
    with pytest.raises(ValueError, match="cli-reference"):
        hook.on_page_markdown("# CLI reference\n", Page("cli.md"), None, None)


def nav_files(nav) -> list[str]:
    out = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        out += nav_files(value) if isinstance(value, list) else [value]
    return out


def test_every_page_is_in_the_nav_and_every_included_snippet_exists():
    class Loader(yaml.SafeLoader):  # mkdocs.yml may name Python objects (!!python/name:...): not needed here
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)
    in_nav = nav_files(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")
                   if p.relative_to(DOCS).parts[0] not in ("hooks", "snippets"))
    assert sorted(in_nav) == pages, "every docs page must be in mkdocs.yml's nav, and only those"
    included = set()
    for page in pages:
        for target in re.findall(r'--8<-- "([^"]+)"', (DOCS / page).read_text()):
            assert (ROOT / target).is_file(), f"{page} includes {target}, which does not exist"
            included.add(Path(target).name)
    assert included == {p.name for p in SNIPPETS.glob("*.py")}, "every snippet is shown on a page (and tested here)"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One real daemon for every snippet (each snippet has its own run name)."""

    from protocol.endpoints import default_endpoint

    tmp = tmp_path_factory.mktemp("docs-daemon")
    # The snippets use the default endpoint (a private socket under $XDG_RUNTIME_DIR): this test's own.
    runtime = tmp / "xdg"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp),
               OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1", XDG_RUNTIME_DIR=str(runtime))
    old = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    try:
        endpoint = default_endpoint()
    finally:
        os.environ.pop("XDG_RUNTIME_DIR") if old is None else os.environ.__setitem__("XDG_RUNTIME_DIR", old)
    d = DaemonProc(tmp, env, endpoint, "--no-wandb", "--galaxy-rows", "0")
    d.runtime_dir = runtime
    yield d
    d.kill()


def run_snippets(daemon: DaemonProc, tmp_path: Path, launches: dict[str, list[str]]) -> dict[str, str]:
    """Start each launch (label -> command prefix + snippet names) at once, every snippet pointed at the
    daemon; a launch of several snippets runs them one after the other in the same processes (torchrun
    starts once). Returns each launch's output by label."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", XDG_RUNTIME_DIR=str(daemon.runtime_dir))
    runner = tmp_path / "run_snippets.py"
    runner.write_text("import runpy, sys\nfor path in sys.argv[1:]:\n    runpy.run_path(path, run_name='__main__')\n")
    procs = {}
    for label, command in launches.items():
        prefix = [c for c in command if not c.endswith(".py")]
        scripts = []
        for name in (c for c in command if c.endswith(".py")):
            source = (SNIPPETS / name).read_text()
            assert "tcp://" not in source  # the snippets reach the daemon at its default private endpoint
            scripts.append(tmp_path / name)
            scripts[-1].write_text(source)
        out = open(tmp_path / f"{label}.log", "w")
        procs[label] = (subprocess.Popen([*prefix, str(runner), *map(str, scripts)], cwd=tmp_path, env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True), out)
    logs = {}
    for label, (proc, out) in procs.items():
        try:
            code = proc.wait(240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too, not only the launcher
            proc.wait()
            code = "timeout"
        out.close()
        logs[label] = (tmp_path / f"{label}.log").read_text()
        assert code == 0, f"{label} exited with {code}:\n{logs[label][-3000:]}"
    return logs


def check_results(daemon: DaemonProc, run: str, expected: list[int]) -> list[dict]:
    """The run's records once it closed: every expected iteration, unless its publishers reported drops."""
    wait_for(f"run {run} to close", lambda: f"run {run}: closed" in daemon.log(), proc=daemon)
    ends = re.findall(rf"run {re.escape(run)}: end \(final iter \S+, trainer published (\d+), dropped (\d+)\)",
                      daemon.log())
    assert ends, f"no end message of run {run}"
    records = daemon.results(run)
    iters = [r["iter"] for r in records]
    if all(int(dropped) == 0 for _, dropped in ends):
        assert iters == expected, f"{run}: analysed {iters}, published {expected}"
    else:  # a loaded host may make the hook drop a snapshot: counted and reported, never silent
        assert iters and set(iters) < set(expected), f"{run}: analysed {iters}, ends {ends}"
    assert all(r["shape"] == records[0]["shape"] for r in records)
    return records


def test_getting_started_snippets_run(daemon: DaemonProc, tmp_path: Path):
    logs = run_snippets(daemon, tmp_path, {"plain": [sys.executable, "plain_loop.py"],
                                           "math": [sys.executable, "math_only.py"]})
    records = check_results(daemon, "my-run", [0, 10, 20, 30])
    assert records[0]["shape"] == [512, 32]
    assert all("train/loss" in r["metrics"] for r in records)
    if len(records) > 1:
        assert records[1]["drift"]["average_cosine_similarity"] < 1.0
    cosine = float(re.search(r"drift cosine ([0-9.]+)", logs["math"]).group(1))
    assert 0.99 < cosine <= 1.0  # a rotation plus 1% noise is (almost) no drift


@pytest.mark.timeout(600)
def test_integration_snippets_run(daemon: DaemonProc, tmp_path: Path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # Each distributed snippet in its own torchrun, as a user runs it: in one process, the FSDP2 snippet's
    # init_process_group after the DDP snippet's destroy_process_group hangs on torchrun's store.
    run_snippets(daemon, tmp_path, {"hf": [sys.executable, "hf_trainer.py"],
                                    "lightning": [sys.executable, "lightning_module.py"],
                                    "ddp": [*torchrun, "ddp.py"]})
    run_snippets(daemon, tmp_path, {"fsdp2": [*torchrun, "fsdp2.py"]})
    assert check_results(daemon, "hf-run", [0, 3, 6])[0]["shape"] == [256, 32]
    assert check_results(daemon, "lightning-run", [0, 3, 6])[0]["shape"] == [256, 32]
    assert check_results(daemon, "ddp-run", [0, 10, 20])[0]["shape"] == [512, 32]
    assert check_results(daemon, "fsdp2-run", [0, 10, 20])[0]["shape"] == [512, 32]
