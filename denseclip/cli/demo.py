"""``denseclip demo``: serve a local web page to try a model on your own images (see
:mod:`denseclip.tools.demo`)."""

from __future__ import annotations

import argparse
import sys

from ..inference import PredictionError
from ..tools.demo import MAX_CONNECTIONS, REQUEST_TIMEOUT, make_server
from ..weights.checkpoint import CheckpointError
from .common import (
    add_max_pixels_argument,
    add_model_arguments,
    add_precision_argument,
    checkpoint_message,
    max_pixels_overrides,
    model_config_only,
    predictor_from_args,
)

HELP = "serve a local web page to try a model on your own images"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``denseclip demo``."""
    add_model_arguments(parser, "weights to serve (a file, a weights name or 'pretrained'); "
                                "'none' for random weights", "demo")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    add_precision_argument(parser)
    parser.add_argument("--max-side", type=int, default=1024,
                        help="uploads larger than this (pixels, longer side) are reduced")
    add_max_pixels_argument(parser)
    parser.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT, metavar="SECONDS",
                        help="drop a connection whose client sends nothing for this long "
                             f"(default {REQUEST_TIMEOUT:g})")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, metavar="N",
                        help="connections served at once; more are answered 503 "
                             f"(default {MAX_CONNECTIONS})")


def run(args: argparse.Namespace) -> int:
    """``denseclip demo``: serve until interrupted (Ctrl-C); 2 if the model cannot load."""
    if not 0 <= args.port <= 65535:
        print(f"denseclip demo: error: --port must be 0..65535, got {args.port}",
              file=sys.stderr)
        return 2
    if args.timeout <= 0 or args.max_connections < 1:
        print(f"denseclip demo: error: --timeout and --max-connections must be positive, got "
              f"{args.timeout:g} and {args.max_connections}", file=sys.stderr)
        return 2
    try:
        cfg = model_config_only(args, "demo", max_pixels_overrides(args))
        predictor = predictor_from_args(args, cfg, "demo", device=args.device)
        server = make_server(predictor, args.host, args.port, args.max_side,
                             request_timeout=args.timeout, max_connections=args.max_connections)
    except (CheckpointError, FileNotFoundError, PredictionError, OSError) as e:
        print(f"denseclip demo: error: {checkpoint_message(e, 'demo')}", file=sys.stderr)
        return 2
    print(f"DenseCLIP demo for {cfg.name} on {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
