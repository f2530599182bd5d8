"""Command-line arguments that ``services.train`` and ``tuning.sweep`` share.

Both start Ray the same way (``init_ray(args.address, args.verbose)``), hold a lease that
``--force`` takes over (``services.lease.acquire_for``) and apply ``key=value`` overrides to a
config, so those arguments are defined once here; each command words their help for itself.
"""

from __future__ import annotations

import argparse

DEFAULT_CONFIG = "ring8"
ADDRESS_HELP = "Ray address (default: RAY_ADDRESS, else start a local Ray)"


def add_job_args(
    parser: argparse.ArgumentParser,
    *,
    force: str,
    quiet: str,
    verbose: str,
    overrides: str,
    force_first: bool = False,
) -> None:
    """Add ``--address``, ``--quiet | --verbose``, ``--force`` and the positional ``overrides``
    to ``parser``, with the given help texts. ``--force`` goes after the verbosity pair, or
    before ``--address`` with ``force_first``: the order each command's ``--help`` has always
    listed them in."""

    def add_force() -> None:
        parser.add_argument("--force", action="store_true", help=force)

    if force_first:
        add_force()
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", action="store_true", help=quiet)
    verbosity.add_argument("--verbose", action="store_true", help=verbose)
    if not force_first:
        add_force()
    parser.add_argument("overrides", nargs="*", help=overrides)
