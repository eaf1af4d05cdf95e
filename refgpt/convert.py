"""``python -m refgpt.convert``: checkpoints to and from Hugging Face GPT-2 folders.

    python -m refgpt.convert --to hf CKPT OUTDIR      # OUTDIR loads with
                                                      # GPT2LMHeadModel.from_pretrained(OUTDIR)
    python -m refgpt.convert --from hf HFDIR CKPT     # CKPT resumes with train --load CKPT
    python -m refgpt.convert --to consolidated CKPT OUT   # a sharded checkpoint as whole
                                                      # tensors: OUT/iter_N/model.safetensors

Hugging Face folders are read and written as config.json + model.safetensors (+ tokenizer.json
when there is one). See :mod:`refgpt.interop` for the name and layout mapping.
"""

from __future__ import annotations

import argparse
import sys

from .checkpoint import consolidate
from .cli import exit_on_user_error, parser
from .interop import export_hf, import_hf


def build_parser() -> argparse.ArgumentParser:
    ap = parser("refgpt.convert", __doc__)
    way = ap.add_mutually_exclusive_group(required=True)
    way.add_argument("--to", choices=["hf", "consolidated"],
                     help="refgpt checkpoint SRC -> format DST (consolidated: refgpt's "
                          "single-file form, whole tensors by name; training loads it too)")
    way.add_argument("--from", dest="source", choices=["hf"], help="format SRC -> refgpt checkpoint DST")
    ap.add_argument("src", help="--to: a refgpt checkpoint folder; --from: a Hugging Face "
                                "GPT-2 folder (config.json, model.safetensors)")
    ap.add_argument("dst", help="the folder to write")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="dtype of the refgpt checkpoint written by --from (default float32)")
    return ap


@exit_on_user_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.to == "consolidated":
        out = consolidate(args.src, args.dst)
    elif args.to:
        out = export_hf(args.src, args.dst)
    else:
        out = import_hf(args.src, args.dst, args.dtype)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
