"""``python -m launcher [+experiment=NAME] [key=value ...]`` (or ``gymlaunch ...``): one run from a Hydra config.

``python -m launcher run.resume=<run folder> [key=value ...]`` (or ``--resume <run folder>``) resumes a
failed or interrupted run in its folder: ``launcher.resume`` unfolds it into the saved overrides first;
a run with every row written is not resumed (exit 0, nothing submitted).
``main`` checks the config before Hydra runs (``launcher.cli``: a refusal leaves no folder behind),
then hands the command line to Hydra, whose task function is ``run``. Exit codes: ``launcher.exit_codes``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape

from launcher import cli, exit_codes, resume
from launcher.sweep import SweepTable
from launcher.spec import SpecError, load_spec  # importing it stores the schemas conf/ starts from (ConfigStore)

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
CONFIG_NAME = "config"


def _console(stderr: bool = False) -> Console:
    # Piped output (CI, log files) keeps whole URLs and paths instead of 80 columns.
    stream = sys.stderr if stderr else sys.stdout
    return Console(width=None if stream.isatty() else 200, stderr=stderr)


def refuse(message: str) -> None:
    """Print a refusal (nothing was submitted: a config error costs no GPU time) and exit 2."""
    _console(stderr=True).print(f"[red bold]config error[/] {escape(message)}")
    sys.exit(exit_codes.REFUSED)


def run(cfg: DictConfig) -> None:
    """Hydra's task function: one run (one point of a multirun) in Hydra's output folder."""
    from launcher.orchestrate import Run  # only runs need it

    # One line per HTTP request would drown the live view.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        spec = load_spec(cfg)
    except SpecError as e:  # checked before Hydra ran; here for the sweep points past that check
        refuse(str(e))
    hydra_cfg = HydraConfig.get()
    # The points of a multirun share servers with equal configurations (launcher/pools.py).
    sweep_dir = hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else None
    code = Run(spec, Path(hydra_cfg.runtime.output_dir), _console(), sweep_dir=sweep_dir,
               overrides=list(hydra_cfg.overrides.task)).execute()
    # A failed point is one result of a sweep, not its end: the other points still run, and the sweep's
    # table shows it beside them (launcher/sweep.py); the sweep exits 1 at its end. Ctrl-C ends it.
    if code and not (sweep_dir is not None and code == exit_codes.FAILED):
        sys.exit(code)


hydra_main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=CONFIG_NAME)(run)


def main() -> None:
    """``python -m launcher`` and the ``gymlaunch`` console script."""
    try:
        try:
            sys.argv[1:] = cli.quote_tilde_values(resume.resume_argv(sys.argv[1:]))
            cli.check_before_hydra(sys.argv[1:], run, CONF_DIR, CONFIG_NAME)
        except (cli.Refused, resume.ResumeRefused) as e:
            refuse(str(e))
        except resume.Finished as e:
            _console().print(escape(str(e)))
            sys.exit(exit_codes.OK)
        hydra_main()
        if SweepTable.not_succeeded:
            _console(stderr=True).print(escape(f"sweep points not succeeded: {', '.join(SweepTable.not_succeeded)}"))
            sys.exit(exit_codes.FAILED)
    except KeyboardInterrupt:  # before the run took over Ctrl-C (it tears down, then exits 130 itself)
        _console(stderr=True).print("[yellow]interrupted[/]")
        sys.exit(exit_codes.INTERRUPTED)


if __name__ == "__main__":
    main()
