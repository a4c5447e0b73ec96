"""Pre-train an embedded default backbone on the synthetic skill mixture: a tiny T5 (``--family seq2seq``,
``models/default/``) or a tiny Llama-architecture decoder (``--family causal``, ``models/default-causal/``), each
with the same byte-level BPE tokenizer.

A frozen *random* tiny model cannot be taught a task by a delta module alone, so the default backbone
is pre-trained on the five skills of the bundled suite, phrased with other prompts and label words
(``dataloader.synthetic.PRETRAIN_TASKS``), plus a copy task that makes every lexicon word an output.
Deterministic from ``--seed``; writes the model folder (safetensors, config, tokenizer.json) and a
per-task report of the held-out accuracy it reached.

The causal model reads one sequence per example: the input's tokens and ``</s>`` (the tokenizer's own ending,
which separates the prompt), then the answer's tokens and ``</s>`` (the end of the answer); the loss is on the
answer alone.

    .venv/bin/python models/pretrain_default.py                    # T5: ~21 min on 2 CPU cores
    .venv/bin/python models/pretrain_default.py --family causal    # Llama-style decoder
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataloader.synthetic import PRETRAIN_TASKS, SUITE, pretraining_stream  # noqa: E402
from models.backbones import FAMILIES  # noqa: E402
from utils.io import staged_dir, with_umask_mode, write_text_atomic  # noqa: E402
from utils.params import HelpFormatter  # noqa: E402

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad 0 (also decoder start), eos 1, unk 2


def train_tokenizer(vocab_size: int, seed: int, corpus_size: int = 30000) -> PreTrainedTokenizerFast:
    """Byte-level BPE: synthetic words become single tokens, and any real text still tokenizes."""
    rng = random.Random(f"tokenizer/{seed}")
    corpus = [" ".join(pair) for pair, _ in zip(pretraining_stream(seed + 1), range(corpus_size))]
    corpus += [" ".join(spec.render(rng)) for spec in SUITE for _ in range(50)]  # the suite's prompt words
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512, add_prefix_space=True,
                                   model_input_names=["input_ids", "attention_mask"])


def encode_causal(tokenizer, pairs, max_input: int = 64, max_output: int = 16) -> dict[str, torch.Tensor]:
    """Prompt (input + </s>) and answer (output + </s>) in one right-padded sequence; labels only on the answer."""
    prompts = tokenizer([x for x, _ in pairs], max_length=max_input, truncation=True).input_ids
    answers = tokenizer([y for _, y in pairs], max_length=max_output, truncation=True).input_ids
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    input_ids = torch.full((len(pairs), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        n = len(prompt) + len(answer)
        input_ids[i, :n] = torch.tensor(prompt + answer)
        labels[i, len(prompt):n] = torch.tensor(answer)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def encode(tokenizer, pairs, max_input: int = 64, max_output: int = 16) -> dict[str, torch.Tensor]:
    inputs = tokenizer([x for x, _ in pairs], max_length=max_input, truncation=True, padding=True,
                       return_tensors="pt")
    labels = tokenizer([y for _, y in pairs], max_length=max_output, truncation=True, padding=True,
                       return_tensors="pt").input_ids
    labels[labels == tokenizer.pad_token_id] = -100
    return {"input_ids": inputs.input_ids, "attention_mask": inputs.attention_mask, "labels": labels}


@torch.no_grad()
def heldout_accuracy(model, tokenizer, n_per_task: int = 64) -> dict[str, float]:
    """Exact-match accuracy by greedy generation on fresh examples of each pre-training task."""
    model.eval()
    causal = not model.config.is_encoder_decoder
    report = {}
    for spec in PRETRAIN_TASKS:
        rng = random.Random(f"heldout/{spec.name}")
        pairs = [spec.render(rng) for _ in range(n_per_task)]
        if causal:  # left-padded prompts; the answer is what follows them, up to </s>
            tokenizer.padding_side = "left"
            batch = tokenizer([x for x, _ in pairs], padding=True, return_tensors="pt")
            tokenizer.padding_side = "right"
            out = model.generate(**batch, max_new_tokens=12, num_beams=1, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            out = out[:, batch.input_ids.shape[1]:]
        else:
            batch = tokenizer([x for x, _ in pairs], padding=True, return_tensors="pt")
            out = model.generate(**batch, max_new_tokens=12, num_beams=1, do_sample=False)
        preds = [p.strip() for p in tokenizer.batch_decode(out, skip_special_tokens=True)]
        report[spec.name] = sum(p == y for p, (_, y) in zip(preds, pairs)) / n_per_task
    model.train()
    return report


def skill_accuracy(task_accuracy: dict[str, float]) -> dict[str, float]:
    """Average the per-task accuracy over the tasks of each skill."""
    by_skill: dict[str, list[float]] = defaultdict(list)
    for spec in PRETRAIN_TASKS:
        by_skill[spec.family].append(task_accuracy[spec.name])
    return {family: round(sum(v) / len(v), 3) for family, v in by_skill.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--family", choices=("seq2seq", "causal"), default="seq2seq",
                        help="seq2seq: a tiny T5 (models/default); causal: a tiny Llama-style decoder "
                             "(models/default-causal)")
    parser.add_argument("--output_dir", default=None,
                        help="the backbone's folder, written whole (default: models/default or models/default-causal)")
    parser.add_argument("--steps", type=int, default=5000, help="pre-training steps")
    parser.add_argument("--batch_size", type=int, default=64, help="examples per step")
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="AdamW peak learning rate")
    parser.add_argument("--warmup_steps", type=int, default=300, help="linear warm-up steps")
    parser.add_argument("--vocab_size", type=int, default=2000, help="BPE vocabulary size asked of the trainer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tokenizer, the weights and the data stream")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of torch")
    parser.add_argument("--eval_every", type=int, default=1000, help="print held-out accuracy every N steps")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tokenizer = train_tokenizer(args.vocab_size, args.seed)
    causal = args.family == "causal"
    family = FAMILIES[args.family]
    model = family.new_model(family.tiny_config(len(tokenizer)))
    encode_batch = encode_causal if causal else encode
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer: {len(tokenizer)} tokens; model: {n_params / 1e6:.2f}M parameters", flush=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    decay_steps = args.steps - args.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to 0
        optimizer, lambda s: min((s + 1) / args.warmup_steps, max(0.0, (args.steps - s) / decay_steps)))
    stream = pretraining_stream(args.seed)
    model.train()
    start, running = time.time(), 0.0
    for step in range(1, args.steps + 1):
        batch = encode_batch(tokenizer, [next(stream) for _ in range(args.batch_size)])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        if step % 100 == 0:
            print(f"step {step}/{args.steps} loss {running / 100:.4f} lr {schedule.get_last_lr()[0]:.2e} "
                  f"{time.time() - start:.0f}s", flush=True)
            running = 0.0
        if step % args.eval_every == 0 and step < args.steps:
            print(f"step {step} held-out accuracy:", json.dumps(skill_accuracy(heldout_accuracy(model, tokenizer, 32))),
                  flush=True)
    seconds = time.time() - start

    accuracy = heldout_accuracy(model, tokenizer)
    skills = skill_accuracy(accuracy)
    print("held-out accuracy by skill:", json.dumps(skills, indent=1), flush=True)

    out = Path(args.output_dir or Path(__file__).resolve().parent / ("default-causal" if causal else "default"))
    report = {"family": args.family, "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
              "seconds": round(seconds), "parameters": n_params, "vocab_size": len(tokenizer), "skill_accuracy": skills,
              "task_accuracy": accuracy}
    # Built beside the old backbone and swapped in by renames: a crash never leaves models/default missing.
    # the tokenizer file records the last padding used; both families save the same one (right, batch longest)
    tokenizer.backend_tokenizer.enable_padding(direction="right", pad_id=tokenizer.pad_token_id,
                                               pad_token=tokenizer.pad_token)
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            with_umask_mode(f)  # save_pretrained writes some files 0600
        write_text_atomic(tmp / "pretrain_report.json", json.dumps(report, indent=1) + "\n")
    print(f"saved {out} after {seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
