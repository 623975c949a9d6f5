"""Experiment tracking for ``pstar_plugins.train`` through Accelerate's trackers
(``--report-to tensorboard``, ``wandb``, ``mlflow``, ...; the ``--report_to`` of transformers'
``*_no_trainer.py`` examples). Trackers live on the main process only; Accelerate's ``log`` is a
no-op elsewhere. TensorBoard event files go to ``--output-dir``/``PROJECT``.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Mapping

from pstar_plugins.contract.errors import ConfigError

logger = logging.getLogger("pstar_plugins.train")

PROJECT = "pstar-plugins"
"""Project (wandb, mlflow experiment) and run folder (TensorBoard) name."""

TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
CHOICES = ("none", "all") + TRACKERS
_PACKAGE = {"tensorboard": "tensorboard", "comet_ml": "comet-ml"}  # pip name when it differs from the tracker's


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--report-to",
        nargs="+",
        default=["none"],
        choices=CHOICES,
        metavar="TRACKER",
        help=f"log loss, learning rate, evaluation metrics and the run's configuration to these trackers "
        f"({', '.join(CHOICES)}; 'all': every installed one; default: none)",
    )


def selected(args) -> list[str]:
    """The trackers ``--report-to`` asks for; ``[]`` for none. Raises before anything loads when
    a named tracker's package is missing (Accelerate would silently skip it)."""
    names = list(dict.fromkeys(args.report_to))
    if "none" in names:
        if len(names) > 1:
            raise ConfigError(
                f"--report-to {' '.join(names)}: 'none' cannot be combined with trackers; pass one or the other."
            )
        return []
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    if "all" in names:
        found = sorted(available & set(TRACKERS))
        if not found:
            logger.warning(
                "--report-to all: no tracker package is installed, nothing is logged "
                "(pip install 'pstar-plugins[tracking]' for TensorBoard)"
            )
        return found
    missing = [n for n in names if n not in available]
    if missing:
        packages = " ".join(_PACKAGE.get(n, n) for n in missing)
        raise ConfigError(
            f"--report-to {' '.join(missing)}: the tracker's package is not installed; "
            f"pip install {packages} (TensorBoard: pip install 'pstar-plugins[tracking]'), or drop it from --report-to."
        )
    return names


def accelerator_kwargs(args) -> dict[str, Any]:
    """``Accelerator(**accelerator_kwargs(args))``: the trackers and where file-based ones write."""
    trackers = selected(args)
    return {"log_with": trackers, "project_dir": args.output_dir} if trackers else {}


def _plain(value: Any) -> Any:
    """Configuration values as trackers take them (TensorBoard's hparams: numbers, strings, bools)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return "" if value is None else str(value)


def start(accelerator, config: Mapping[str, Any]) -> None:
    """Open the run and store its configuration (no-op without trackers)."""
    if accelerator.log_with:
        accelerator.init_trackers(PROJECT, config={k: _plain(v) for k, v in config.items()})


def log(accelerator, values: Mapping[str, float], step: int) -> None:
    if accelerator.log_with:
        accelerator.log(dict(values), step=step)
