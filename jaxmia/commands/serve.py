"""``jaxmia serve``: a recognizer as an HTTP recognition service with a persistent store.

    jaxmia serve --checkpoint runs/clone/service --workdir runs/serve [--port 8000]
    jaxmia serve ... --config.serve.misrecognition=0.3 --config.serve.detector=hash

The policy (answers, budgets, misrecognition, near-duplicate detection) is ``config.serve``;
see ``jaxmia.service.server`` for the endpoints. WORKDIR keeps the store (``service.db``), the
administrator's key (``admin.key``) and the settings; a restart resumes from them.
"""

from __future__ import annotations

import argparse

import ml_collections

from jaxmia.errors import JaxmiaError
from jaxmia.service import server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, metavar="DIR", help="recognizer folder (jaxmia train)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")


def run(args: argparse.Namespace, config: ml_collections.ConfigDict) -> None:
    if not 0 < args.port < 65536:
        raise JaxmiaError(f"--port {args.port}: expected 1..65535")
    server.serve(config, args.checkpoint, args.workdir, host=args.host, port=args.port)
