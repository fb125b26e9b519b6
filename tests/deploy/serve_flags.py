"""What a deploy artefact's ``pdserve serve`` command line builds: the real parser and the
real config builder, so a flag the CLI does not know fails the test."""

from __future__ import annotations

from collections.abc import Sequence

from engine.config import ServeConfig
from router.launch.cli import build_parser
from router.launch.flags import serve_config


def serve_config_of(argv: Sequence[str]) -> ServeConfig:
    """``argv`` without the program name; without ``--model`` a placeholder stands in (the
    demo model is not built: nothing here runs)."""
    argv = list(argv)
    assert argv[0] == "serve", argv
    if not any(a == "--model" or a.startswith("--model=") for a in argv):
        argv += ["--model", "unused"]
    return serve_config(build_parser().parse_args(argv))
