"""``python -m launcher [+experiment=NAME] [key=value ...]``: one run from a Hydra config."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from rich.console import Console

from launcher.orchestrate import Run
from launcher.spec import SpecError, load_spec  # importing it stores the schemas conf/ starts from (ConfigStore)

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    # One line per HTTP request would drown the live view.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Piped output (CI, log files) keeps whole URLs and paths instead of 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 200)
    try:
        spec = load_spec(cfg)
    except SpecError as e:
        # Nothing was submitted yet: a config error costs no GPU time.
        console.print(f"[red bold]config error[/] {e}")
        sys.exit(2)
    hydra_cfg = HydraConfig.get()
    # The points of a multirun share servers with equal configurations (launcher/pools.py).
    sweep_dir = hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else None
    code = Run(spec, Path(hydra_cfg.runtime.output_dir), console, sweep_dir=sweep_dir).execute()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
