"""Copy a model directory with one weight of one PyTorch module perturbed (seeded).

    python scripts/perturb_weight.py out/qformer-base --module layers.4.cross_attn -o out/bad

The fault `qcexport parity DIR --localize` must name: the acceptance run of issue 13.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qcrun.errors import UserError

from qcexport.localize.perturb import perturb_weight


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--module", required=True, help="dotted PyTorch module path")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--scale", type=float, default=0.5,
                        help="noise in standard deviations of the weight [0.5]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--initializer", default=None, help="which weight (default: the first)")
    args = parser.parse_args(argv)
    try:
        name = perturb_weight(args.model_dir, args.module, args.output, scale=args.scale,
                              seed=args.seed, initializer=args.initializer)
    except UserError as e:
        print(f"error: {e.stage}: {e.args[0]}", file=sys.stderr)
        if e.hint:
            print(f"fix: {e.hint}", file=sys.stderr)
        return 1
    print(f"perturbed {name} of {args.module}: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
