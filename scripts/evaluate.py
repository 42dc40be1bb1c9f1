#!/usr/bin/env python3
"""Compare a fine-tuned model with its base on the same prompts, and measure loss and perplexity on data.

python evaluate.py generate --model out/8b-lora --prompt "Name a primary colour."    # base vs adapter
python evaluate.py generate --model out/8b-merged --baseline meta-llama/Llama-3.1-8B-Instruct --prompts p.txt
python evaluate.py eval --model out/8b-lora --dataset held-out.jsonl --output eval.json
"""

from __future__ import annotations

import argparse

from finetune.errors import run_cli

EXAMPLES = __doc__.split("\n\n", 1)[1]
DTYPES = ("auto", "bfloat16", "float16", "float32")


def _model_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--model",
        required=True,
        help="hub id or directory of a model, a LoRA adapter, or a training run's --output_dir",
    )
    command.add_argument(
        "--adapter",
        default="",
        help="a LoRA adapter (or training run) to put on --model; its base is --model",
    )
    command.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="auto = bfloat16 on GPUs, float32 on CPU (default: auto)",
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="evaluate.py",
        description=__doc__.splitlines()[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser(
        "generate",
        help="answers to the same prompts from the base and the fine-tuned model, side by side",
        description="Generate from the same prompts with two models and print the answers side by side: the "
        "base and base + adapter when the model has an adapter, or --baseline and --model.",
    )
    _model_flags(generate)
    generate.add_argument(
        "--baseline", default="", help="another model to compare with (e.g. the base of a merged model)"
    )
    generate.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for more)")
    generate.add_argument(
        "--prompts",
        default="",
        help="a .txt file (one prompt per line) or a dataset file (prompt column, or any SFT format: "
        "the conversation up to its last answer)",
    )
    generate.add_argument("--max_new_tokens", type=int, default=128, help="(default: %(default)s)")
    generate.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy, the same text every run (default: 0)"
    )
    generate.add_argument("--seed", type=int, default=0, help="sampling seed when --temperature > 0")
    generate.add_argument("--output", default="", help="also write the answers to this .jsonl file")

    score = commands.add_parser(
        "eval",
        help="loss and perplexity on a dataset, as JSON",
        description="Loss and perplexity of a model (or base + adapter, with the base's numbers too) on a "
        "dataset in any format the training scripts read, with the same chat template and response-only loss.",
    )
    _model_flags(score)
    score.add_argument(
        "--dataset", required=True, help="a local .jsonl/.json/.parquet/.csv file, or a hub dataset"
    )
    score.add_argument(
        "--dataset_format",
        choices=("auto", "alpaca", "sharegpt", "messages", "text"),
        default="auto",
        help="(default: auto, from the columns)",
    )
    score.add_argument("--dataset_size", type=int, default=None, help="use only the first N rows")
    score.add_argument(
        "--seq_length", type=int, default=2048, help="longer examples are truncated (default: %(default)s)"
    )
    score.add_argument("--batch_size", type=int, default=8, help="(default: %(default)s)")
    score.add_argument("--train_on_prompt", action="store_true", help="score prompt tokens too")
    score.add_argument("--output", default="", help="write the JSON here too")
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)

    def go():
        from finetune import evaluate

        if args.command == "generate":
            evaluate.generate(
                args.model,
                adapter=args.adapter,
                baseline=args.baseline,
                prompts=args.prompt,
                prompts_file=args.prompts,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                seed=args.seed,
                dtype=args.dtype,
                output=args.output,
            )
        else:
            evaluate.evaluate(
                args.model,
                args.dataset,
                adapter=args.adapter,
                dataset_format=args.dataset_format,
                dataset_size=args.dataset_size,
                seq_length=args.seq_length,
                batch_size=args.batch_size,
                train_on_prompt=args.train_on_prompt,
                dtype=args.dtype,
                output=args.output,
            )

    run_cli(go)


if __name__ == "__main__":
    main()
