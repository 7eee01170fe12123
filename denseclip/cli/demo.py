"""``denseclip demo``: serve a local web page to try a model on your own images (see
:mod:`denseclip.tools.demo`)."""

from __future__ import annotations

import argparse
import sys

from ..inference import PredictionError
from ..tools.demo import make_server
from ..weights.checkpoint import CheckpointError
from .common import (
    checkpoint_message,
    max_pixels_overrides,
    model_config_only,
    predictor_from_args,
)


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
