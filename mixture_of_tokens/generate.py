"""`mot generate`: text generation from a model folder, streaming tokens as they come.

Dense and Token Choice models are batch-independent and generate for a single prompt. A Mixture of Tokens model
mixes the tokens of `group_size` sequences at every position, so its output for one prompt depends on the other
prompts generated with it (docs/design.md, "Batch dependence"): `--prompts_file` generates for many prompts in one left-padded batch, and
the command says in plain words when a MoT model gets fewer prompts than its group size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .folders.model_folder import check_mot_routing, load_model_and_tokenizer
from .utils import UserError


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """`--prompt` values followed by the non-empty lines of `--prompts_file`."""
    collected = list(prompts or [])
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise UserError(f"prompts file {prompts_file!r} does not exist")
        collected += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not collected:
        raise UserError("no prompt given; pass --prompt TEXT or --prompts_file FILE (one prompt per line)")
    return collected


def load_for_generation(model_path: str | Path, mot_routing: str | None = None, device: str | None = None):
    """Model folder -> (model in eval mode, tokenizer set up for left padding); loaded as `mot eval` loads it."""
    model, tokenizer = load_model_and_tokenizer(model_path, mot_routing=mot_routing, device=device)
    # Left padding keeps every prompt's last token in the last column, where generation continues.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def batch_dependence_warning(config, num_prompts: int) -> str | None:
    """The plain-words warning for a MoT model given fewer prompts than its group size (None otherwise)."""
    if "mot" not in getattr(config, "mlp_types", []) or num_prompts >= config.group_size:
        return None
    return (
        f"warning: this is a Mixture of Tokens model: it mixes the tokens of {config.group_size} sequences at every "
        f"position, and you gave {num_prompts} prompt(s). The output depends on which prompts are generated "
        "together and differs from the model's behaviour with full groups. Generate for a full batch with "
        "--prompts_file, or convert the model with `mot transition` for output that does not depend on the batch."
    )


def encode_prompts(tokenizer, prompts: list[str], max_context: int, max_new_tokens: int, device):
    """Tokenize (left-padded); refuse prompts that leave no room to generate. Returns (inputs, max_new_tokens)."""
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    lengths = encoded["attention_mask"].sum(-1).tolist()
    for number, length in enumerate(lengths, start=1):
        if length == 0:
            raise UserError(f"prompt {number} is empty after tokenization; give some text")
        if length >= max_context:
            raise UserError(
                f"prompt {number} is {length} tokens long, but the model's context is {max_context} tokens "
                f"(max_position_embeddings); shorten it to at most {max_context - 1} tokens"
            )
    room = max_context - encoded["input_ids"].shape[1]
    if max_new_tokens > room:
        print(f"note: --max_new_tokens {max_new_tokens} would run past the model's context of {max_context} tokens; "
              f"generating {room} tokens", file=sys.stderr)
        max_new_tokens = room
    return encoded.to(device), max_new_tokens


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 50, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, streamer=None) -> list[str]:
    """Generate continuations for `prompts` in one batch; returns the generated text of each (prompt excluded)."""
    import torch
    from transformers import set_seed

    if seed is not None:
        set_seed(seed)
    inputs, max_new_tokens = encode_prompts(
        tokenizer, prompts, model.config.max_position_embeddings, max_new_tokens, model.device
    )
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, streamer=streamer,
            **sampling,
        )
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def _positive(kind, name):
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{name} must be positive, got {text}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mot generate",
        description="Generate text with a model folder. Dense and Token Choice models are batch-independent; a "
                    "Mixture of Tokens model's output depends on the prompts generated together with it.",
    )
    parser.add_argument("model", metavar="MODEL", help="model folder (with its tokenizer)")
    parser.add_argument("--prompt", action="append", help="prompt text (repeat for several prompts in one batch)")
    parser.add_argument("--prompts_file", help="text file with one prompt per line, all generated in one batch")
    parser.add_argument("--max_new_tokens", type=_positive(int, "--max_new_tokens"), default=50)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=_positive(float, "--temperature"), default=1.0,
                        help="sampling temperature (with --do_sample)")
    parser.add_argument("--top_p", type=_positive(float, "--top_p"), default=1.0,
                        help="nucleus sampling probability mass (with --do_sample)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated (one prompt)")
    parser.add_argument("--mot_routing", default=None,
                        help="override the MoT routing (a value of MoTConfig.mot_routing); 'discrete' is the "
                             "temperature -> 0 limit, where each expert takes only the highest-scoring token of its "
                             "group")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    check_mot_routing(args.mot_routing)
    if args.top_p > 1:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")

    prompts = read_prompts(args.prompt, args.prompts_file)
    if args.stream and len(prompts) > 1:
        raise UserError(f"--stream prints one sequence, but {len(prompts)} prompts were given; "
                        "drop --stream or give one prompt")
    model, tokenizer = load_for_generation(args.model, args.mot_routing, args.device)
    warning = batch_dependence_warning(model.config, len(prompts))
    if warning:
        print(warning, file=sys.stderr)
        # The model logs its own, more technical note about small groups; one warning is enough.
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger(type(model).__module__).setLevel(hf_logging.ERROR)

    streamer = None
    if args.stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    texts = generate(model, tokenizer, prompts, args.max_new_tokens, args.do_sample, args.temperature, args.top_p,
                     args.seed, streamer)
    if streamer is None:
        for number, (prompt, text) in enumerate(zip(prompts, texts, strict=True), start=1):
            if len(prompts) > 1:
                print(f"=== {number} ===")
            print(prompt + text)
    return 0
