"""Train the GAN-path demo's stand-in annotator (see factory/toy/annotator.py) on toy-world ground truth.

    python jobs/train_annotator.py OUT.safetensors [--resolution 32] [--steps 2000]

The shipped factory/weights/toy_annotator.safetensors is this script's output with the defaults.
"""

import argparse
import json
import logging

from factory.toy import segmenter
from factory.toy.annotator import train_annotator

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="where to write the segmenter (.safetensors) and its record (.json)")
    parser.add_argument("--resolution", type=int, default=32, help="image size (the shipped GAN's: 32)")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps (batch 32)")
    args = parser.parse_args()
    record = train_annotator(args.out, args.resolution,
                             fit_cfg=segmenter.FitConfig(steps=args.steps, batch_size=32, lr=2e-3))
    print(json.dumps(record["held_out"], indent=2))
