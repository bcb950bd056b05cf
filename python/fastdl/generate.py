"""``fastdl generate``: continue a prompt with a GPT-2 model, printing the text as it comes.

:func:`add_arguments` fills an argparse parser and :func:`run` generates. The text goes to
stdout; the timings (time to the first token, which includes the prompt's prefill, and tokens
per second after it) go to stderr. Building the parser imports no torch.
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time
from pathlib import Path

__all__ = ["add_arguments", "run", "DESCRIPTION", "EPILOG"]

DESCRIPTION = "Continue a prompt with a GPT-2 model (a local Hugging Face folder, or a preset with random weights)."
EPILOG = """examples:
  fastdl generate --model ~/models/gpt2 --prompt "Every effort moves you" --max-new-tokens 50 --top-k 40
  fastdl generate --model ~/models/gpt2 --prompt "The capital of France is" --temperature 0
  fastdl generate --model gpt2-tiny --prompt "hello" --max-new-tokens 200   # random weights: a speed check"""

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="PATH|PRESET",
        help="a Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin), "
        "or a preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl, gpt2-tiny, bytes-tiny) with "
        "random weights drawn from --seed",
    )
    parser.add_argument("--prompt", default="", help="the text to continue (empty: start from <|endoftext|>)")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens")
    parser.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="sample among the most likely tokens that make up P of the probability",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling (and a preset's weights)")
    parser.add_argument(
        "--tokenizer",
        default="auto",
        metavar="auto|gpt2|bytes|PATH",
        help="auto: the model folder's vocab.json if it has one, bytes for a 257-token vocabulary, else GPT-2's BPE",
    )
    parser.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA if available, else CPU")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weights and activations")


def _load_model(spec: str, seed: int):
    import torch

    from .models.gpt2 import GPT, PRESETS, GPTConfig

    if Path(spec).is_dir():
        return GPT.from_pretrained(spec)
    if spec in PRESETS:
        torch.manual_seed(seed)
        print(f"{spec}: random weights (seed {seed})", file=sys.stderr)
        return GPT(GPTConfig.from_name(spec))
    raise ValueError(f"--model {spec!r} is neither a folder nor a preset ({', '.join(PRESETS)})")


def _load_tokenizer(spec: str, model_spec: str, vocab_size: int):
    from .data.tokenizer import ByteTokenizer, GPT2Tokenizer, get_tokenizer

    if spec != "auto":
        tokenizer = get_tokenizer(spec)
    elif Path(model_spec).is_dir() and (
        (Path(model_spec) / "vocab.json").is_file() or any(Path(model_spec).glob("*.tiktoken"))
    ):
        tokenizer = GPT2Tokenizer.from_file(model_spec)
    elif vocab_size == ByteTokenizer.vocab_size:
        tokenizer = ByteTokenizer()
    else:
        tokenizer = GPT2Tokenizer.default()
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}")
    return tokenizer


def run(args: argparse.Namespace, prog: str = "fastdl generate") -> int:
    """Generate from parsed arguments; a bad setting prints ``prog: error: ...`` and returns 2."""
    import torch

    try:
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = _load_model(args.model, args.seed).to(device=device, dtype=getattr(torch, args.dtype)).eval()
        tokenizer = _load_tokenizer(args.tokenizer, args.model, model.config.vocab_size)
        ids = tokenizer.encode(args.prompt, allowed_special="all") if args.prompt else [tokenizer.eot_token]
        prompt = torch.tensor([ids], device=device)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span two tokens
        times: list[float] = []

        def show(tokens):
            token = int(tokens[0])  # reading the value waits for the device, so the time is right
            times.append(time.perf_counter())
            if len(times) == 1:  # written now, so that an argument error leaves stdout empty
                sys.stdout.write(args.prompt)
            if token != tokenizer.eot_token:
                sys.stdout.write(text.decode(tokenizer.decode_bytes([token])))
                sys.stdout.flush()

        start = time.perf_counter()
        model.generate(
            prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token_id=tokenizer.eot_token,
            generator=generator,
            stream=show,
        )
        if times:
            sys.stdout.write(text.decode(b"", final=True) + "\n")
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    if times:
        report = f"prompt {len(ids)} tokens: first token after {1000 * (times[0] - start):.1f} ms (prefill)"
        if len(times) > 1:
            rate = (len(times) - 1) / (times[-1] - times[0])
            report += f"; {len(times)} tokens, {rate:.1f} tokens/s after the first"
        print(report, file=sys.stderr)
    return 0
