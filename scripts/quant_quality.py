"""Quantization quality on a model with structured weights (docs/benchmarks.md, *Quantization quality*).

Random weights amplify quantization noise, so this trains a small Llama 3 on text that is on every machine
with Python (the standard library's own .py files, held-out files for evaluation), then measures, for
none / int8 / int4 at several group sizes:

  - held-out perplexity, with transformers on weights quantized and dequantized by cake.model.quant (every
    2-D weight: the layers' projections, the embedding and the head);
  - top-1 agreement: the share of held-out positions whose most likely next token is the f32 model's;
  - the same perplexity once more through cake's own quantized inference (Master(..., quantize=...)), on a
    subset of the windows, to show the two paths agree.

Besides top-1 agreement, the mean KL divergence from the f32 model's next-token distribution (as llama.cpp's
perplexity tool reports it) shows how far the predictions move even where perplexity hardly changes.

It also compares cake's min/max int4 with alternatives implemented here only (they write the same stored
form, so adopting one changes quantize() and nothing else): "LS refit", min/max then scale and zero refitted
by least squares for the q it gave (as llama.cpp's k-quants refit); "clip search", each group's range
searched over a 7x7 grid of shrink factors for its two ends for the least squared error, then the same
refit; and HQQ's half-quadratic zero-point refinement. For each: the weights' relative RMSE, held-out
perplexity, agreement, KL, and the seconds to quantize a 4096x4096 matrix.

The vocabulary is Llama 3's tokenizer restricted to the training split: its most frequent tokens are kept,
every other token is spelled out with Llama 3's own byte tokens (no unknown token, nothing lost). Seeded; the
trained model is written with save_pretrained under --workdir and reused when present.

    python scripts/quant_quality.py                # first run about 8 minutes on 2 busy CPU cores, 5.5 training
    python scripts/quant_quality.py --steps 50     # a quick look (a barely trained model)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cake.model import quant  # noqa: E402

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo"}
SEP = 128000  # <|begin_of_text|>, put before every file


@dataclass(frozen=True)
class Spec:
    hidden: int = 128
    intermediate: int = 344  # not a multiple of 32: down_proj's last int4 group is padded, as cake pads it
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 4096
    seq: int = 128
    batch: int = 16
    steps: int = 240
    lr: float = 3e-3
    seed: int = 0
    max_files: int = 0  # 0: every file of the corpus

    def name(self) -> str:
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        return f"llama-h{self.hidden}-l{self.layers}-v{self.vocab}-s{self.steps}-{digest}"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- data ---------------------------------------------------------------------------------------------

def corpus_files(root: Path | None = None, max_files: int = 0) -> list[Path]:
    """The standard library's .py files (not its tests), sorted; every k-th one when max_files caps them."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts))
    if max_files and len(files) > max_files:
        files = files[::math.ceil(len(files) / max_files)]
    return files


def is_held_out(path: Path) -> bool:
    """One file in ten, chosen by a hash of its name: the same split on every machine and run."""
    return hashlib.sha1(path.name.encode()).digest()[0] % 10 == 0


def llama3_tokenizer():
    from tokenizers import Tokenizer

    from cake.synthetic import llama3_tokenizer_json
    return Tokenizer.from_file(str(llama3_tokenizer_json()))


def encode_files(files: list[Path], tokenizer) -> list[list[int]]:
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    return [[SEP] + e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


@dataclass
class Vocab:
    """Llama 3 ids kept (new id = position), and every other id's spelling in kept byte tokens."""

    kept: list[int]

    @staticmethod
    def build(train: list[list[int]], size: int, tokenizer) -> "Vocab":
        byte_tokens = sorted({tokenizer.token_to_id(c) for c in _byte_chars()})
        counts = Counter(i for doc in train for i in doc)
        skip = {SEP, *byte_tokens}
        rest = [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if i not in skip]
        kept = [SEP] + byte_tokens + rest[:max(0, size - 1 - len(byte_tokens))]
        return Vocab(kept)

    def encoder(self, tokenizer):
        index = {t: n for n, t in enumerate(self.kept)}
        spell: dict[int, list[int]] = {}

        def one(t: int) -> list[int]:
            if t in index:
                return [index[t]]
            if t not in spell:
                spell[t] = [index[tokenizer.token_to_id(c)] for c in tokenizer.id_to_token(t)]
            return spell[t]
        return lambda doc: [n for t in doc for n in one(t)]


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-character table, which Llama 3's byte-level BPE uses: 256 single-character tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@dataclass
class Data:
    vocab: Vocab
    train: torch.Tensor  # 1-D stream of new ids
    held: torch.Tensor
    files: tuple[int, int]  # train, held-out
    llama3_tokens: tuple[int, int]


def load_data(spec: Spec, root: Path | None = None, vocab: Vocab | None = None) -> Data:
    files = corpus_files(root, spec.max_files)
    train_files = [p for p in files if not is_held_out(p)]
    held_files = [p for p in files if is_held_out(p)]
    tok = llama3_tokenizer()
    t0 = time.perf_counter()
    train_docs, held_docs = encode_files(train_files, tok), encode_files(held_files, tok)
    vocab = vocab or Vocab.build(train_docs, spec.vocab, tok)
    enc = vocab.encoder(tok)
    train = torch.tensor([n for d in train_docs for n in enc(d)], dtype=torch.long)
    held = torch.tensor([n for d in held_docs for n in enc(d)], dtype=torch.long)
    say(f"corpus: {len(train_files)} train / {len(held_files)} held-out files, "
        f"{sum(map(len, train_docs))} / {sum(map(len, held_docs))} Llama 3 tokens -> {len(train)} / {len(held)} "
        f"in the {len(vocab.kept)}-token vocabulary ({time.perf_counter() - t0:.1f} s)")
    return Data(vocab, train, held, (len(train_files), len(held_files)),
                (sum(map(len, train_docs)), sum(map(len, held_docs))))


def windows(stream: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """`count` non-overlapping windows [count, length], evenly spaced over the stream."""
    n = len(stream) // length
    if n < count:
        raise SystemExit(f"the held-out text holds {n} windows of {length} tokens, fewer than the {count} asked")
    starts = [(k * n // count) * length for k in range(count)]
    return torch.stack([stream[s:s + length] for s in starts])


# ---- the model ----------------------------------------------------------------------------------------

def llama_config(spec: Spec):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
                       num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, vocab_size=spec.vocab,
                       max_position_embeddings=2 * spec.seq, rms_norm_eps=1e-5, rope_theta=500000.0,
                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)


def train(spec: Spec, data: Data, log_every: int = 50):
    """AdamW, warm-up then cosine decay, random windows of the training stream; deterministic for a given
    seed and torch thread count."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(llama_config(spec)).float().train()
    decay = [p for p in model.parameters() if p.dim() == 2]
    other = [p for p in model.parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=spec.lr, betas=(0.9, 0.95))
    warm = max(1, spec.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.1 + 0.45 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, spec.steps - warm))))))
    gen = torch.Generator().manual_seed(spec.seed)
    t0, seen = time.perf_counter(), 0.0
    for step in range(spec.steps):
        starts = torch.randint(0, len(data.train) - spec.seq - 1, (spec.batch,), generator=gen)
        batch = torch.stack([data.train[s:s + spec.seq + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, spec.vocab), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        seen = 0.9 * seen + 0.1 * loss.item() if step else loss.item()
        if (step + 1) % log_every == 0 or step + 1 == spec.steps:
            dt = time.perf_counter() - t0
            say(f"step {step + 1}/{spec.steps}  loss {seen:.3f}  {dt:.0f} s  "
                f"({(step + 1) * spec.batch * spec.seq / dt:.0f} tokens/s)")
    return model.eval()


def prepare(spec: Spec, workdir: Path) -> tuple[Path, torch.Tensor, dict]:
    """The trained model's folder for `spec` (trained now unless it is there), its held-out token stream and
    what it was trained on."""
    out = workdir / spec.name()
    if (out / "heldout.pt").exists():
        say(f"reusing {out}")
    else:
        data = load_data(spec)
        model = train(spec, data)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        torch.save(data.held.to(torch.int16), tmp / "heldout.pt")
        (tmp / "corpus.json").write_text(json.dumps({
            "python": platform.python_version(), "files": data.files, "llama3_tokens": data.llama3_tokens,
            "tokens": [len(data.train), len(data.held)], "spec": asdict(spec), "llama3_ids": data.vocab.kept}))
        tmp.rename(out)
        say(f"wrote {out}")
    return out, torch.load(out / "heldout.pt").long(), json.loads((out / "corpus.json").read_text())


# ---- quantizers compared with cake's min/max ----------------------------------------------------------

def _int4_error(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """q for groups g [rows, groups, group] under (scale, zero) as stored (bf16), and each group's squared error."""
    s, z = scale.to(quant.STORE_DTYPE).float(), zero.to(quant.STORE_DTYPE).float()
    safe = torch.where(s == 0, 1.0, s)
    q = torch.round((g - z[..., None]) / safe[..., None] + 8).clamp_(0, 15)
    err = ((q - 8) * s[..., None] + z[..., None] - g).pow_(2).sum(-1)
    return q, s, z, err


def _groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    w = w.float()
    out, k = w.shape
    padded = math.ceil(k / group) * group
    if padded != k:  # padded as cake pads: copies of the row's last value
        w = torch.cat([w, w[:, -1:].expand(out, padded - k)], dim=1)
    return w.view(out, -1, group), k


def _stored(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, k: int, group: int) -> quant.Quantized:
    out = q.shape[0]
    return quant.Quantized("int4", quant.pack_int4(q.reshape(out, -1)), s.to(quant.STORE_DTYPE),
                           z.to(quant.STORE_DTYPE), k, group)


SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def quantize_clip(w: torch.Tensor, group: int, shrink: tuple[float, ...] = SHRINK, refits: int = 2,
                  block_rows: int = 512) -> quant.Quantized:
    """int4 in cake's stored form, each group's range chosen for the least squared error: both ends shrunk
    toward the middle by every pair of factors in `shrink` (min/max is the pair (1, 1), so never worse),
    then scale and zero refitted by least squares for the chosen q and q rounded again, kept if better."""
    parts = []
    for r in range(0, w.shape[0], block_rows):
        g, k = _groups(w[r:r + block_rows], group)
        lo, hi = g.amin(-1), g.amax(-1)
        mid = (lo + hi) / 2
        best = None
        for a in shrink:
            for b in shrink:
                lo2, hi2 = mid + a * (lo - mid), mid + b * (hi - mid)
                scale = (hi2 - lo2) / 15
                cand = _int4_error(g, scale, lo2 + 8 * scale.to(quant.STORE_DTYPE).float())
                best = cand if best is None else _better(best, cand)
        for _ in range(refits):
            q = best[0] - 8
            qm, wm = q.mean(-1, keepdim=True), g.mean(-1, keepdim=True)
            var = (q - qm).pow(2).sum(-1)
            s = torch.where(var > 0, ((q - qm) * (g - wm)).sum(-1) / torch.where(var > 0, var, 1.0), best[1])
            z = wm[..., 0] - s * qm[..., 0]
            best = _better(best, _int4_error(g, s.clamp(min=0), z))
        q, s, z, _ = best
        parts.append(_stored(q, s, z, k, group))
    return quant.concat(parts)


def _better(a, b):
    keep = (b[3] < a[3])
    return (torch.where(keep[..., None], b[0], a[0]), torch.where(keep, b[1], a[1]), torch.where(keep, b[2], a[2]),
            torch.where(keep, b[3], a[3]))


def quantize_hqq(w: torch.Tensor, group: int, iters: int = 20, lp: float = 0.7, beta: float = 10.0,
                 kappa: float = 1.01, block_rows: int = 512) -> quant.Quantized:
    """int4 in cake's stored form, HQQ's way (Badri & Shaji 2023, hqq's optimize_weights_proximal_legacy):
    the scale from min/max, the zero point refined by half-quadratic steps that minimise an l_p (p < 1)
    norm of the error, stopping when the mean absolute error of the block stops falling."""
    parts = []
    for r in range(0, w.shape[0], block_rows):
        g, k = _groups(w[r:r + block_rows], group)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        inv = 15 / (hi - lo).clamp(min=1e-8)  # hqq's scale: q = round(w * inv + zero)
        zero = -lo * inv
        b, best_err = beta, math.inf
        for _ in range(iters):
            q = torch.round(g * inv + zero).clamp_(0, 15)
            r_ = (q - zero) / inv
            e = g - r_
            e = torch.sign(e) * F.relu(e.abs() - (1 / b) * (e.abs() + 1e-8).pow(lp - 1))
            zero = (q - (g - e) * inv).mean(-1, keepdim=True)
            b *= kappa
            err = float((g - r_).abs().mean())
            if err >= best_err:
                break
            best_err = err
        s = (1 / inv)[..., 0]
        # w = (q - zero) / inv = (q - 8) * s + (8 - zero) * s: cake's form with its zero = (8 - zero) * s
        z = (8 - zero[..., 0]) * s
        q, s, z, _ = _int4_error(g, s, z)
        parts.append(_stored(q, s, z, k, group))
    return quant.concat(parts)


METHODS = {"min/max": lambda w, scheme, group: quant.quantize(w, scheme, group),
           "LS refit": lambda w, scheme, group: quantize_clip(w, group, shrink=(1.0,)),
           "clip search": lambda w, scheme, group: quantize_clip(w, group),
           "HQQ": lambda w, scheme, group: quantize_hqq(w, group)}


# ---- measuring ----------------------------------------------------------------------------------------

@dataclass
class Result:
    label: str
    scheme: str
    group: int
    method: str
    ppl: float
    top1: float  # share of positions whose argmax is the f32 model's
    kl: float  # mean KL(f32 || this) per position, nats
    rel_rmse: float  # of all 2-D weights together: |W_q - W| / |W|
    nll: float
    sub_nll: float  # on the first `sub` windows only


@torch.no_grad()
def evaluate(model, wins: torch.Tensor, ref: list[torch.Tensor] | None = None, batch: int = 8) -> tuple:
    """Over every position but each window's last: each window's mean next-token NLL, the argmax at each
    position, each window's mean KL(ref || model) in nats (0 without `ref`), and the log-probabilities (by batch)."""
    nlls, tops, kls, logps = [], [], [], []
    for n, i in enumerate(range(0, len(wins), batch)):
        ids = wins[i:i + batch]
        logp = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
        nlls.append(-logp.gather(-1, ids[:, 1:, None])[..., 0].double().mean(-1))
        tops.append(logp.argmax(-1))
        kls.append(torch.zeros(len(ids), dtype=torch.float64) if ref is None else
                   (ref[n].exp() * (ref[n] - logp)).sum(-1).double().mean(-1))
        logps.append(logp)
    return torch.cat(nlls), torch.cat(tops), torch.cat(kls), logps


@torch.no_grad()
def quantized_copy(model, originals: dict[str, torch.Tensor], scheme: str, group: int, method: str) -> float:
    """Load every 2-D weight of `model` with its quantized-and-dequantized original; the relative RMSE."""
    err = ref = 0.0
    for name, p in model.named_parameters():
        w = originals[name]
        if p.dim() == 2 and scheme != "none":
            p.copy_(METHODS[method](w, scheme, group).dequantize())
            err += float((p - w).double().pow(2).sum())
            ref += float(w.double().pow(2).sum())
        else:
            p.copy_(w)
    return math.sqrt(err / ref) if ref else 0.0


@torch.no_grad()
def cake_nll(model_dir: Path, wins: torch.Tensor, scheme: str, group: int) -> float:
    """Mean next-token NLL through cake's own inference: a Master with no workers, quantizing at load."""
    from cake.master import Master
    from cake.model.kv_cache import Row
    from cake.topology import load_topology

    master = Master(model_dir, load_topology(None), device="cpu", dtype="f32", quantize=scheme, group_size=group)
    layers = master.config.num_hidden_layers
    total, count = 0.0, 0
    for ids in wins:
        ids = ids[None]
        hidden = master.stack.forward(master.head.embed(ids), [Row(master.stack.new_cache(), 0)], 0, layers)
        logits = master.head.logits(hidden)[0, :-1].float()
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total / count


def cases(groups: tuple[int, ...], methods: tuple[str, ...]) -> list[tuple[str, int, str]]:
    out = [("none", 0, "min/max"), ("int8", 0, "min/max")]
    for m in methods:
        out += [("int4", g, m) for g in groups]
    return out


def measure(model_dir: Path, wins: torch.Tensor, sub: int = 8, groups: tuple[int, ...] = (32, 64, 128),
            methods: tuple[str, ...] = tuple(METHODS)) -> list[Result]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    results, ref_top, ref = [], None, None
    for scheme, group, method in cases(groups, methods):
        t0 = time.perf_counter()
        rmse = quantized_copy(model, originals, scheme, group, method)
        nlls, top, kl, logps = evaluate(model, wins, ref)
        if ref is None:  # the first case is f32
            ref_top, ref = top, logps
        label = scheme if scheme != "int4" else f"int4 g{group}" + ("" if method == "min/max" else f" {method}")
        nll = float(nlls.mean())
        results.append(Result(label, scheme, group, method, math.exp(nll), float((top == ref_top).float().mean()),
                              float(kl.mean()), rmse, nll, float(nlls[:sub].mean())))
        say(f"{label}: perplexity {math.exp(nll):.3f}, top-1 agreement {results[-1].top1:.4f}, KL {results[-1].kl:.5f}, "
            f"relative RMSE {rmse:.4f} ({time.perf_counter() - t0:.1f} s)")
    return results


def quantize_seconds(method: str, group: int = 32, size: int = 4096) -> float:
    w = torch.randn(size, size, generator=torch.Generator().manual_seed(0)) * 0.02
    METHODS[method](w[:256], "int4", group)  # warm-up
    t0 = time.perf_counter()
    METHODS[method](w, "int4", group)
    return time.perf_counter() - t0


# ---- the report ---------------------------------------------------------------------------------------

def table(results: list[Result], cake_rows: dict[str, tuple[float, float]], n_windows: int, n_cake: int) -> str:
    f32 = results[0].ppl
    lines = [f"| weights | held-out perplexity ({n_windows} windows) | vs f32 | top-1 agreement with f32 "
             f"| KL from f32, nats/token | relative RMSE of the weights "
             f"| perplexity on {n_cake} windows: transformers / cake |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if r.method != "min/max":
            continue
        c = cake_rows.get(r.label)
        lines.append(f"| {r.label if r.scheme != 'none' else 'f32 (none)'} | {r.ppl:.3f} | "
                     f"{100 * (r.ppl / f32 - 1):+.2f}% | {100 * r.top1:.2f}% | {r.kl:.6f} | {r.rel_rmse:.4f} | "
                     + (f"{c[0]:.4f} / {c[1]:.4f} |" if c else "|"))
    return "\n".join(lines)


def scheme_table(results: list[Result], seconds: dict[str, float]) -> str:
    f32 = results[0].ppl
    lines = ["| int4 scheme | group | relative RMSE | held-out perplexity | vs f32 | top-1 agreement "
             "| KL from f32 | seconds for a 4096x4096 matrix (group 32) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted((r for r in results if r.scheme == "int4"), key=lambda r: (r.group, list(METHODS).index(r.method))):
        lines.append(f"| {r.method} | {r.group} | {r.rel_rmse:.4f} | {r.ppl:.3f} | {100 * (r.ppl / f32 - 1):+.2f}% "
                     f"| {100 * r.top1:.2f}% | {r.kl:.6f} | {seconds.get(r.method, float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "cake-quant-quality", help="where the trained model is kept and reused (%(default)s)")
    p.add_argument("--steps", type=int, default=Spec.steps, help="training steps (%(default)s)")
    p.add_argument("--eval-windows", type=int, default=64, help=f"held-out windows of {Spec.seq} tokens (%(default)s)")
    p.add_argument("--cake-windows", type=int, default=8, help="of which cake's own path runs (%(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (%(default)s: on a busy 2-core machine one trained 3x faster than two)")
    p.add_argument("--no-timing", action="store_true", help="skip timing the quantizers on a 4096x4096 matrix")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    spec = replace(Spec(), steps=args.steps)
    t0 = time.perf_counter()
    model_dir, held, corpus = prepare(spec, args.workdir)
    wins = windows(held, spec.seq, args.eval_windows)
    results = measure(model_dir, wins, args.cake_windows)
    sub = wins[:args.cake_windows]
    cake_rows = {}
    for r in results:
        if r.method == "min/max":
            cake_rows[r.label] = (math.exp(r.sub_nll), math.exp(cake_nll(model_dir, sub, r.scheme, r.group or quant.DEFAULT_GROUP)))
            say(f"{r.label} on {len(sub)} windows: transformers {cake_rows[r.label][0]:.4f}, cake {cake_rows[r.label][1]:.4f}")
    seconds = {} if args.no_timing else {m: quantize_seconds(m) for m in METHODS}
    for m, sec in seconds.items():
        say(f"{m}: {sec:.2f} s for a 4096x4096 matrix at group 32")
    print(f"Model: Llama 3 architecture, hidden {spec.hidden}, {spec.layers} layers, {spec.heads}/{spec.kv_heads} "
          f"heads, intermediate {spec.intermediate}, vocabulary {spec.vocab}, untied head; trained {spec.steps} steps "
          f"of {spec.batch}x{spec.seq} tokens on Python {corpus['python']}'s standard library "
          f"({corpus['files'][0]} files), evaluated on {args.eval_windows} windows of {spec.seq} tokens from "
          f"{corpus['files'][1]} held-out files; {args.threads} torch thread(s). Total {time.perf_counter() - t0:.0f} s.\n")
    print(table(results, cake_rows, args.eval_windows, len(sub)))
    print()
    print(scheme_table(results, seconds))


if __name__ == "__main__":
    main()
