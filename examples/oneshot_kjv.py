"""One-shot pruning of a small language model trained here: magnitude, Wanda, RIA and SparseGPT at
50% unstructured, 2:4 and 4:8, with a calibration-size ablation; and Wanda / SparseGPT at 50-80%
with uniform and OWL (outlier-weighed) sparsity per block.

    apt-get install bible-kjv                      # the corpus: the King James Bible (public domain)
    python examples/oneshot_kjv.py --out runs/oneshot-kjv

There is no pretrained LLM offline, so the script first trains one (once; it is reused): a
Llama-style causal LM from a ``transformers`` config (11.7M parameters: hidden 320, 6 layers,
5 query heads sharing 1 key/value head, SwiGLU 864; an 8192-token byte-level BPE trained on the
training split), on
the KJV text split in order 90 / 5 / 5 % (train / validation / test), until validation
perplexity stops improving. The model and tokenizer are saved with ``save_pretrained``, so
``secateurs oneshot --model runs/oneshot-kjv/dense --text kjv`` prunes the same model.

Every pruning pass starts from the dense model, draws its calibration windows (128 tokens)
from the training split, and is measured by test perplexity and wall time.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from secateurs.experiments.oneshot import TEXTS, split_text
from secateurs.methods.oneshot import calibration_samples, perplexity, prune_oneshot


def tokenizer_for(texts, vocab: int, directory: Path):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return fast


def train_lm(directory: Path, splits, seqlen: int, max_epochs: int, seed: int):
    import transformers

    torch.manual_seed(seed)
    tokenizer = tokenizer_for([splits["train"]], 8192, directory)
    ids = {k: torch.tensor(tokenizer(v)["input_ids"]) for k, v in splits.items()}
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=320, intermediate_size=864, num_hidden_layers=6,
        num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=seqlen,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
    )
    model = transformers.LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    windows = ids["train"][: ids["train"].numel() // seqlen * seqlen].reshape(-1, seqlen)
    steps_per_epoch = math.ceil(len(windows) / 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max_epochs * steps_per_epoch, pct_start=0.05)
    history, best = [], math.inf
    g = torch.Generator().manual_seed(seed)
    for epoch in range(max_epochs):
        model.train()
        t0 = time.time()
        for idx in torch.randperm(len(windows), generator=g).split(32):
            x = windows[idx]
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        val = perplexity(model, ids["validation"], seqlen)
        history.append({"epoch": epoch + 1, "val_ppl": val, "seconds": time.time() - t0})
        print(f"epoch {epoch + 1}: validation perplexity {val:.2f} ({time.time() - t0:.0f} s)", flush=True)
        if val > best * 0.99:  # less than 1% better: plateau
            best = min(best, val)
            break
        best = val
        model.save_pretrained(directory)
    (directory / "training.json").write_text(json.dumps({"parameters": params, "history": history}, indent=2))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/oneshot-kjv")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--max-epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import transformers

    out = Path(args.out)
    dense_dir = out / "dense"
    splits = split_text(TEXTS.get("kjv")())
    if not (dense_dir / "training.json").is_file():
        dense_dir.mkdir(parents=True, exist_ok=True)
        train_lm(dense_dir, splits, args.seqlen, args.max_epochs, args.seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(dense_dir, local_files_only=True)
    train_ids = torch.tensor(tokenizer(splits["train"])["input_ids"])
    test_ids = torch.tensor(tokenizer(splits["test"])["input_ids"])

    def fresh():
        return transformers.AutoModelForCausalLM.from_pretrained(dense_dir, local_files_only=True).eval()

    results_path = out / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.is_file() else []
    done = {(r["method"], r["pattern"], r["nsamples"], r.get("allocation", "uniform")) for r in rows}
    dense_ppl = perplexity(fresh(), test_ids, args.seqlen)
    grid = [(m, pat, 128) for pat in ("50%", "2:4", "4:8") for m in ("magnitude", "wanda", "ria", "sparsegpt")]
    grid += [(m, "50%", n) for m in ("wanda", "sparsegpt") for n in (8, 32)]
    grid += [(m, "2:4", n) for m in ("wanda", "sparsegpt") for n in (8, 32)]
    grid = [(m, pat, n, "uniform") for m, pat, n in grid]
    grid += [(m, f"{s}%", 128, a) for s in (60, 70, 80) for m in ("wanda", "sparsegpt") for a in ("uniform", "owl")]
    grid += [(m, "50%", 128, "owl") for m in ("wanda", "sparsegpt")]
    for method, pattern, n, allocation in grid:
        if (method, pattern, n, allocation) in done:
            continue
        model = fresh()
        nm = None if pattern.endswith("%") else tuple(int(v) for v in pattern.split(":"))
        sparsity = int(pattern[:-1]) / 100 if nm is None else None
        samples = calibration_samples(train_ids, n, args.seqlen, args.seed)
        t0 = time.perf_counter()
        result = prune_oneshot(model, samples, method, sparsity, nm=nm, allocation=allocation)
        seconds = time.perf_counter() - t0
        rows.append({"method": method, "pattern": pattern, "nsamples": n, "sparsity": result.sparsity,
                     "ppl": perplexity(model, test_ids, args.seqlen), "seconds": seconds, "allocation": allocation,
                     "block_sparsity": result.block_sparsity})
        print(rows[-1], flush=True)
        results_path.write_text(json.dumps(rows, indent=2))
    training = json.loads((dense_dir / "training.json").read_text())
    lines = [f"Dense: {training['parameters'] / 1e6:.1f}M parameters, test perplexity {dense_ppl:.2f} "
             f"({len(test_ids):,} test tokens; trained {len(training['history'])} epochs).", "",
             "| method | 50% | 2:4 | 4:8 | pass time (s, 50%) |", "|---|---|---|---|---|"]
    uniform = [r for r in rows if r.get("allocation", "uniform") == "uniform"]
    for method in ("magnitude", "wanda", "ria", "sparsegpt"):
        cell = {r["pattern"]: r for r in uniform if r["method"] == method and r["nsamples"] == 128}
        lines.append(f"| {method} | {cell['50%']['ppl']:.2f} | {cell['2:4']['ppl']:.2f} | {cell['4:8']['ppl']:.2f} | "
                     f"{cell['50%']['seconds']:.1f} |")
    lines += ["", "| calibration sequences | Wanda 50% | SparseGPT 50% | Wanda 2:4 | SparseGPT 2:4 |", "|---|---|---|---|---|"]
    for n in (8, 32, 128):
        cell = {(r["method"], r["pattern"]): r["ppl"] for r in uniform if r["nsamples"] == n}
        lines.append(f"| {n} | {cell[('wanda', '50%')]:.2f} | {cell[('sparsegpt', '50%')]:.2f} | "
                     f"{cell[('wanda', '2:4')]:.2f} | {cell[('sparsegpt', '2:4')]:.2f} |")
    lines += ["", "| sparsity | Wanda | Wanda + OWL | SparseGPT | SparseGPT + OWL | OWL block sparsities (Wanda) |",
              "|---|---|---|---|---|---|"]
    for pattern in ("50%", "60%", "70%", "80%"):
        cell = {(r["method"], r.get("allocation", "uniform")): r for r in rows
                if r["pattern"] == pattern and r["nsamples"] == 128}
        owl = " ".join(f"{x:.3f}" for x in cell[("wanda", "owl")]["block_sparsity"])
        lines.append(f"| {pattern} | " + " | ".join(f"{cell[(m, a)]['ppl']:.2f}" for m in ("wanda", "sparsegpt")
                                                     for a in ("uniform", "owl")) + f" | {owl} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
