"""The command line's flags for a job's options (:class:`queuebert.schema.JobOptions`).

A new job option gets its flag here, spelt as the option's field with dashes: :func:`job_options`
reads every option back by its field name, so the commands that send jobs need no change.
"""

from __future__ import annotations

import argparse
from typing import cast

from queuebert.schema import FUNCTIONS, OPTION_NAMES, JobError, JobOptionFields, JobOptions


def add_option_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-k", type=int, default=None, help="labels per result, best first (default: all)")
    p.add_argument("--function-to-apply", choices=FUNCTIONS, default=None,
                   help="how logits become scores, as the text-classification pipeline's function_to_apply "
                        "(default: the model's rule: sigmoid for multi-label or one-label models, else softmax)")


def job_options(args: argparse.Namespace) -> JobOptionFields:
    """The options the command's flags ask for, as the clients' keyword arguments."""
    return cast("JobOptionFields", {name: getattr(args, name) for name in OPTION_NAMES if hasattr(args, name)})


def check_option_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad options as a usage error (exit 2) before any input is read or job sent."""
    try:
        JobOptions(**job_options(args))
    except JobError as exc:  # its message starts with the option's name (JobOptions' rule)
        name, _, why = str(exc).partition(" ")
        parser.error(f"--{name.replace('_', '-')} {why}")
