#!/usr/bin/env python3
"""Merge a LoRA adapter into its base, convert a model to GGUF, and write an Ollama Modelfile.

python export.py merge --adapter out/8b-lora --output_dir out/8b-merged
python export.py gguf --model out/8b-merged --outfile out/8b.gguf --outtype q8_0
python export.py ollama --gguf out/8b.gguf --model out/8b-merged --outfile out/Modelfile
"""

from __future__ import annotations

import argparse

from finetune.errors import run_cli

EXAMPLES = __doc__.split("\n\n", 1)[1]


def parser() -> argparse.ArgumentParser:
    from finetune.export import GGUF_TYPES, MERGE_DTYPES

    top = argparse.ArgumentParser(
        prog="export.py",
        description=__doc__.splitlines()[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = commands.add_parser(
        "merge",
        help="adapter + base → full model (safetensors); checks the logits",
        description="Fold a LoRA adapter into its base model and save the result. The merged model's logits "
        "must match the base with the adapter attached, on a fixed prompt, or nothing is written.",
    )
    merge.add_argument(
        "--adapter", required=True, help="the adapter directory, or a training run's --output_dir"
    )
    merge.add_argument("--output_dir", required=True, help="where the merged model goes")
    merge.add_argument(
        "--base_model",
        default="",
        help="the unquantized base model (default: the one the adapter's adapter_config.json names)",
    )
    merge.add_argument(
        "--dtype",
        choices=MERGE_DTYPES,
        default="bfloat16",
        help="dtype of the merged weights (default: %(default)s)",
    )
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")

    gguf = commands.add_parser(
        "gguf",
        help="model → GGUF file for llama.cpp / Ollama; reads it back to check it",
        description="Convert a (merged) Llama-architecture model to GGUF. Uses llama.cpp's convert_hf_to_gguf.py "
        "when it is on PATH, else the gguf Python package. The file is read back and checked (tensors, "
        "metadata, and logits against the source model where transformers can load GGUF).",
    )
    gguf.add_argument("--model", required=True, help="directory of the full (merged) model")
    gguf.add_argument("--outfile", required=True, help="the .gguf file to write")
    gguf.add_argument(
        "--outtype", choices=GGUF_TYPES, default="f16", help="tensor type (default: %(default)s)"
    )
    gguf.add_argument(
        "--converter",
        choices=("auto", "llama.cpp", "builtin"),
        default="auto",
        help="auto = llama.cpp's convert_hf_to_gguf.py if it is on PATH, else the built-in one",
    )
    gguf.add_argument(
        "--no_logits_check",
        dest="check_logits",
        action="store_false",
        help="skip loading both models to compare logits (it needs about 8 bytes per parameter of memory)",
    )
    gguf.add_argument("--overwrite", action="store_true", help="replace an existing --outfile")

    ollama = commands.add_parser(
        "ollama",
        help="write an Ollama Modelfile for a GGUF file",
        description="Write a Modelfile for `ollama create`: FROM the GGUF file, the tokenizer's chat template "
        "as a Go template, its stop tokens, and an optional system prompt.",
    )
    ollama.add_argument("--gguf", required=True, help="the GGUF file")
    ollama.add_argument("--model", required=True, help="the model directory it came from (for the tokenizer)")
    ollama.add_argument(
        "--outfile", default="Modelfile", help="the Modelfile to write (default: %(default)s)"
    )
    ollama.add_argument("--system", default="", help="a system prompt to build in")
    ollama.add_argument("--overwrite", action="store_true", help="replace an existing --outfile")
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)

    def go():
        from finetune import export

        if args.command == "merge":
            export.merge(
                args.adapter,
                args.output_dir,
                base_model=args.base_model,
                dtype=args.dtype,
                overwrite=args.overwrite,
            )
        elif args.command == "gguf":
            export.to_gguf(
                args.model,
                args.outfile,
                outtype=args.outtype,
                converter=args.converter,
                check_logits=args.check_logits,
                overwrite=args.overwrite,
            )
        else:
            export.write_modelfile(
                args.gguf, args.model, args.outfile, system=args.system, overwrite=args.overwrite
            )

    run_cli(go)


if __name__ == "__main__":
    main()
