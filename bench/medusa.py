"""Medusa heads against draft models and n-gram drafting: training, tokens per forward, speedup.

    python -m bench medusa --cpu_costs performance.md   # ~1-2 min: r(T) from docs/performance.md
    python -m bench medusa --cpu_costs performance.md --heads_cost measure   # + the heads' cost
    python -m bench medusa                              # r(T) and the heads' cost measured here

Three measurements, on the test fixture tests/fixtures/tiny-4h (a genuine checkpoint with RANDOM
weights: the numbers show the mechanism, not GPT-2's accuracy) and on the official 355M shape
(random weights: costs only).

1. Training. H = 4 heads trained by the library's own code, step for step what `python -m
   gpt2_numpy.medusa train` does (write_text, split, rows, evaluate, Adam, train_epoch), on text
   the target writes itself; per epoch the training loss and the held-out loss, per head the
   held-out loss, top-1 and top-3 before and after, on whole held-out sequences:
       T = 1     3000 tokens sampled at temperature 1 after single tokens (the command's default
                 text), 3 epochs, lr 1e-3: held out, honest
       T = 0.3   8000 tokens at temperature 0.3, 4 epochs, lr 3e-3: held out, honest
       memorised the target's greedy continuations of the very prompts decoded below, each
                 written twice, 200 epochs, lr 1e-2: the held-out sequences are training ones,
                 so this is the best case (what heads that know the text can give), not
                 generalisation
2. Tokens per target forward (tau): greedy (T = 0) and sampled (T = 1) runs of
   gpt2_numpy.tree_speculative_sample on the prompts of `python -m bench tree` (random 8-token
   prompts, 40 tokens each) for chains of one candidate per head and a few trees, drafted by
   Medusa heads (untrained, and the three trained above), by bench tree's draft model pairs
   (its `pairs()`: tiny-3h, and tiny-4h with noise 0.01 and 0.02 on every weight; chains through
   speculative_sample, as there) and by n-gram lookup (NGramDrafter, n <= 3). Every greedy run's
   text is compared with the target's own greedy text.
3. Predicted speedup over autoregressive decoding: the tokens of those runs over the cost of
   their rounds, each round priced by its own node count n (a round drafts nothing where the
   drafter had nothing to say: the first Medusa round, an n-gram miss), in target forwards over
   one row:
       Medusa      r_t(n + 1) + h        h: the H heads on one row (H [d, d] products and
                                         [H, d] @ [d, V] with the LM head), 0 where n = 0
       draft model r_t(n + 1) + c * sum over its forwards of r_d(rows)   (bench tree's formula)
       n-gram      r_t(n + 1)            (the lookup's host time left out: microseconds)
   with the costs of the official 355M target and 124M draft shapes on two machines:
       this CPU  r(T) and c measured here (bench tree's cpu_costs) or docs/performance.md's
                 table (T <= 9 only); h measured here at the 355M shape (random weights, the
                 best of several interleaved repetitions, in units of the target's one-row
                 forward timed in the same loop) or estimated from docs/performance.md's
                 streaming rate and its cost of a few-row product
       H100      docs/gpu.md's r(T) and c (fused kernels, CUDA graphs); h estimated from its
                 kernel profile as the heads would cost ON THE DEVICE (the code runs them on
                 the host: see docs/medusa.md)
   The measured cost also times the verify forward two ways, as the heads' drafter runs it
   (hidden states, then the LM head, every row kept) and as a plain tree verify: the extra the
   heads cost the verify.

It writes bench_out/medusa.json and img/medusa.png, and prints the tables of docs/medusa.md.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import gpt2_numpy as gpt2
import numpy as np
from gpt2_numpy import MedusaHeads
from gpt2_numpy.backend import to_numpy
from gpt2_numpy.medusa.heads import Adam
from gpt2_numpy.medusa.train import evaluate, rows, split, train_epoch, write_text
from gpt2_numpy.products import attach
from gpt2_numpy.tree import Tree, TreeDrafter, tree_size

from . import ROOT, command
from .machine import machine_info
from .models import RANDOM, prompt_ids
from .report import bad_input
from .timing import quiet_sample
from .tree import (H100_C, H100_R, PERF_C, PERF_R, cpu_costs, draft_rows, interpolated,
                   measured_only, pairs)

N_HEADS = 4  # every Medusa drafter here has 4 heads: chains up to K = 4, trees of depth <= 3
TOP = 3  # the w of the top-w accuracy
HELD_OUT, BATCH, SEED = 0.1, 64, 0  # the command's defaults (--held_out, --batch, --seed)
N_NEW, PROMPT_LENGTH = 40, 8  # bench tree's prompts and run length
# The training texts (the command's flags in comments); "prompts": written after the very
# prompts decoded, greedily, each twice, so that the held-out share leaves every one to train on.
TRAINING = {
    "T = 1": dict(tokens=3000, temperature=1.0, length=64, epochs=3, lr=1e-3, prompts=False),
    "T = 0.3": dict(tokens=8000, temperature=0.3, length=64, epochs=4, lr=3e-3, prompts=False),
    "memorised": dict(temperature=0.0, length=PROMPT_LENGTH + N_NEW, epochs=200, lr=1e-2,
                      prompts=True),
}
SHAPES = [(1,), (1, 1), (1, 1, 1), (1, 1, 1, 1), (2,), (3,), (2, 1), (2, 1, 1), (3, 1), (2, 2),
          (2, 2, 1), (3, 2, 1), (2, 2, 2)]
NGRAM = "n-gram (n <= 3)"

# The heads' cost from documents, not measured here (--heads_cost estimate):
# docs/performance.md: the one-row 355M forward of its r(T) table (53.8 ms), the streaming rate
# of a one-row product (the floor: 30.8 GB/s), and what a T-row product costs over a one-row one
# (all of 355M's matrices, the best way per T: its "few-row products" table).
PERF_MS_T1 = 53.8
PERF_GBPS = 30.8
PERF_FEW_ROWS = {1: 1.00, 2: 1.81, 3: 1.89, 4: 1.87, 5: 1.88}
# docs/gpu.md, H100 (fused kernels, 355M float32): the kernel profile's lm_head over one row
# (67.6 us, at the streaming rate) and its [d, d] gemv (attn.c_proj, 5.4 us); the one-row step.
H100_LM_HEAD_US, H100_DD_US, H100_MS_T1 = 67.6, 5.4, 1.26
RANDOM_SHAPES = "random weights in the 355M shape: the costs only (they say nothing of accuracy)"


def drafter_kind(name: str) -> str:
    return "medusa" if name.startswith("Medusa") else "ngram" if name == NGRAM else "model"


def is_chain(widths) -> bool:
    return all(w == 1 for w in widths)


def shape_name(widths) -> str:
    return f"K={len(widths)}" if is_chain(widths) else ",".join(map(str, widths))


def bench_prompts(target, n_prompts):
    """bench tree's prompts: the same random 8-token prompts, from the same seed."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, target.n_vocab, PROMPT_LENGTH).tolist() for _ in range(n_prompts)]


# --- 1. Training --------------------------------------------------------------------------------


def train_heads(target, spec: dict, prompts, n_heads: int = N_HEADS, seed: int = SEED):
    """Heads trained as `python -m gpt2_numpy.medusa train` trains them (its run(), the same
    calls in the same order, one seeded generator for the text, the split and the order), and
    what the command prints: per epoch the training and held-out losses (summed over heads), per
    head (the LM head first) the held-out scores before and after.  -> (heads, record)"""
    rng = np.random.default_rng(seed)
    length = min(spec["length"], target.n_ctx)
    if spec["prompts"]:  # each prompt's greedy text twice (written once: write_text's memo)
        text = write_text(target, 2 * len(prompts) * length, length, gpt2.Warp(0.0), rng, prompts)
    else:
        text = write_text(target, spec["tokens"], length, gpt2.Warp(spec["temperature"]), rng)
    training, held = split(text, HELD_OUT, rng)
    h, targets = rows(training, n_heads)
    h_held, targets_held = rows(held, n_heads)
    seen = {tuple(s.tokens) for s in training}
    heads = MedusaHeads.untrained(target, n_heads)
    wte = np.asarray(target.params["wte"])  # [V, d], the tied LM head, frozen
    before = evaluate(heads, h_held, targets_held, wte, TOP)
    before_training = sum(s["loss"] for s in evaluate(heads, h, targets, wte, 1)[1:])
    adam = Adam([heads.W, heads.b], spec["lr"])
    epochs = []
    for _ in range(spec["epochs"]):
        loss = train_epoch(heads, adam, h, targets, wte, BATCH, rng)
        held_loss = sum(s["loss"] for s in evaluate(heads, h_held, targets_held, wte, 1)[1:])
        epochs.append({"training": loss, "held_out": held_loss})
    after = evaluate(heads, h_held, targets_held, wte, TOP)
    record = {**{k: v for k, v in spec.items() if k != "prompts"},
              "tokens": sum(len(s.tokens) for s in text), "after_prompts": spec["prompts"],
              "sequences": len(text), "training_rows": len(h), "held_out_sequences": len(held),
              "held_out_rows": len(h_held),
              "held_out_also_trained_on": sum(tuple(s.tokens) in seen for s in held),
              "untrained_training": before_training,
              "untrained_held_out": sum(s["loss"] for s in before[1:]), "epochs_loss": epochs,
              "heads": [{"head": k, "before": b, "after": a}
                        for k, (b, a) in enumerate(zip(before, after))]}
    return heads, record


# --- 2. Tokens per target forward ---------------------------------------------------------------


def decode(target, drafter, widths, temperature: float, prompts, n_new: int) -> dict:
    """Every prompt decoded with the drafter: the tokens, the rounds (target forwards) and each
    round's node count (what it costs), and the outputs."""
    tokens, nodes, outputs = 0, [], []
    for i, prompt in enumerate(prompts):
        rng, warp = np.random.default_rng(i), gpt2.Warp(temperature)
        if is_chain(widths) and not isinstance(drafter, MedusaHeads):  # as bench tree runs chains
            ids, stats = gpt2.speculative_sample(target, drafter, prompt, n_new, K=len(widths),
                                                 warp=warp, rng=rng)
        else:
            ids, stats = gpt2.tree_speculative_sample(target, drafter, prompt, n_new, widths,
                                                      warp, rng)
        tokens += stats.n_generated
        nodes += stats.K_per_round
        outputs.append(ids)
    return {"tokens": tokens, "rounds": len(nodes), "tau": tokens / len(nodes),
            "nodes_per_round": nodes, "outputs": outputs}


# --- 3. Costs and predicted speedup -------------------------------------------------------------


def shape_of(widths, n: int):
    """The widths a round of n nodes had: the tree cut to its first levels near the end of a run
    (tree.fit), or a chain of n."""
    if is_chain(widths):
        return (1,) * n
    for depth in range(len(widths), -1, -1):
        if tree_size(widths[:depth]) <= n:
            return tuple(widths[:depth])


def round_cost(kind: str, widths, n: int, costs: dict):
    """One round of n nodes, in target forwards over one row (None where a cost is unknown)."""
    r_t = costs["r_target"](n + 1)
    if n == 0 or r_t is None:  # a plain target step: nothing drafted
        return r_t
    if kind == "medusa":
        return r_t + costs["heads"]
    if kind == "ngram":
        return r_t
    parts = [costs["r_draft"](rows) for rows in draft_rows(shape_of(widths, n))]
    return None if None in parts else r_t + costs["c"] * sum(parts)


def predicted_speedup(kind, widths, run: dict, costs: dict):
    """Tokens over the cost of every round, against autoregressive decoding's one forward a
    token (prefills left out: the same for both)."""
    total = 0.0
    for n in set(run["nodes_per_round"]):
        cost = round_cost(kind, widths, n, costs)
        if cost is None:
            return None
        total += cost * run["nodes_per_round"].count(n)
    return run["tokens"] / total


def heads_cost_estimated(n_heads: int) -> dict:
    """The heads' cost without timing anything. This CPU: bytes at docs/performance.md's
    streaming rate, the LM head's H rows at its measured cost of an H-row product over a one-row
    one (the products pack; flops are not the limit: 2 H (d^2 + d V) = 0.42 GFLOP is ~3 ms at
    the ~130 GFLOP/s of a 355M prefill). H100: docs/gpu.md's kernel times, the heads on the
    device."""
    h = gpt2.official_hparams("355M")
    d, V = h["n_embd"], h["n_vocab"]
    w_ms = n_heads * (d * d + d) * 4 / PERF_GBPS / 1e6  # H one-row [d, d] products (and b)
    lm_ms = V * d * 4 / PERF_GBPS / 1e6 * PERF_FEW_ROWS[min(n_heads, max(PERF_FEW_ROWS))]
    gpu_us = n_heads * H100_DD_US + H100_LM_HEAD_US * interpolated(H100_R["355M"])(n_heads)
    return {"this CPU": {"heads_ms": w_ms + lm_ms, "target_ms_T1": PERF_MS_T1,
                         "h": (w_ms + lm_ms) / PERF_MS_T1,
                         "source": "estimate: docs/performance.md's streaming rate "
                                   f"({PERF_GBPS} GB/s) and few-row product cost "
                                   f"({PERF_FEW_ROWS[min(n_heads, max(PERF_FEW_ROWS))]}x for "
                                   f"{n_heads} rows), its 355M one-row forward ({PERF_MS_T1} ms)"},
            "H100": {"heads_ms": gpu_us / 1e3, "target_ms_T1": H100_MS_T1,
                     "h": gpu_us / 1e3 / H100_MS_T1,
                     "source": f"estimate, heads on the device: docs/gpu.md's kernel profile "
                               f"({n_heads} x {H100_DD_US} us [d, d] gemv + {H100_LM_HEAD_US} us "
                               f"lm_head x r({n_heads})), its 355M one-row step ({H100_MS_T1} ms)"}}


def heads_cost_measured(n_heads: int, reps: int, log, size: str = "355M", n_past: int = 64,
                        hparams: dict = None):
    """Timed here, on random weights in an official shape (or `hparams`'s; the products' plan
    attached, as load_model attaches it): the target's forward over one row at cache length
    n_past, the heads on one row (MedusaHeads.logits, as a draft calls it), and a chain of
    n_heads nodes verified two ways: as the heads' drafter does (hidden states, then the LM
    head, every row kept) and as a plain tree verify. Each repetition times each once,
    interleaved, a sample taken while other processes were busy retried once; the best counts."""
    h = hparams or gpt2.official_hparams(size)
    model = gpt2.GPT2(h, gpt2.random_params(h, seed=0), name=size)
    attach(model)
    heads = MedusaHeads.untrained(model, n_heads)
    rng = np.random.default_rng(0)
    heads.W[:] = 0.02 * rng.standard_normal(heads.W.shape, dtype=np.float32)  # values: no matter
    ids = prompt_ids(model, n_past + 1 + n_heads, seed=1)
    cache = model.new_cache(n_past + 1 + n_heads)
    model(ids[:n_past], cache, n_logits=0)
    tree = Tree(ids[n_past])  # the root and a chain of n_heads nodes, one per head
    for i in range(n_heads):
        tree.add(i, ids[n_past + 1 + i])
    wte = to_numpy(model.params["wte"])  # what the drafter reads (MedusaHeads.verify)
    row = model.hidden_states(ids[n_past : n_past + 1], cache)  # [1, d]

    def verify(how):
        def step():
            cache.rollback(n_past)
            how(model, tree, cache)
        return step

    steps = {"target, 1 row": verify(lambda m, t, c: m(t.tokens[:1], c)),
             "heads, 1 row": lambda: heads.logits(row, wte),
             "verify, plain": verify(lambda m, t, c: TreeDrafter.verify(heads, m, t, c)),
             "verify, for the heads": verify(heads.verify)}
    for step in steps.values():
        step()  # untimed: pages and buffers touched once
    samples = {name: [] for name in steps}
    for rep in range(reps):
        for name, step in steps.items():
            samples[name].append(quiet_sample(step, tries=2))
        log(f"  heads' cost: repetition {rep + 1}/{reps}")
    ms = {name: 1e3 * min(s for s, _ in v) for name, v in samples.items()}
    t1 = ms["target, 1 row"]
    return {"heads_ms": ms["heads, 1 row"], "target_ms_T1": t1, "h": ms["heads, 1 row"] / t1,
            "verify_rows": n_heads + 1, "verify_plain_ms": ms["verify, plain"],
            "verify_heads_ms": ms["verify, for the heads"],
            "verify_extra": (ms["verify, for the heads"] - ms["verify, plain"]) / t1,
            "max_foreign_of_best": max(min(v)[1] for v in samples.values()), "reps": reps,
            "n_past": n_past, "weights": RANDOM, "size": size,
            "source": f"measured here, {size} random weights, best of {reps}"}


def machines(cpu: dict, heads: dict) -> dict:
    """The two machines' costs: r_target(T), r_draft(T), c and h, each a target forward."""
    return {"this CPU": {"r_target": measured_only(cpu["r"]["355M"]),
                         "r_draft": measured_only(cpu["r"]["124M"]), "c": cpu["c"],
                         "heads": heads["this CPU"]["h"]},
            "H100": {"r_target": interpolated(H100_R["355M"]),
                     "r_draft": interpolated(H100_R["124M"]), "c": H100_C,
                     "heads": heads["H100"]["h"]}}


# --- The whole measurement ----------------------------------------------------------------------


def measure(n_prompts: int, n_new: int, reps: int, log, cpu: str = "measure",
            heads_cost: str = "estimate", shapes=SHAPES, training=TRAINING) -> dict:
    if cpu == "measure":  # bench tree's measurement of r(T) and c, here
        Ts = list(range(1, max(tree_size(s) for s in shapes) + 2))
        cpu_r = cpu_costs(Ts, reps, log)
    else:
        cpu_r = {"r": PERF_R, "c": PERF_C, "ms_T1": {"355M": PERF_MS_T1, "124M": 19.4},
                 "weights": RANDOM, "n_past": 64, "source": "docs/performance.md"}
    head_costs = heads_cost_estimated(N_HEADS)
    if heads_cost == "measure":
        head_costs["this CPU"] = heads_cost_measured(N_HEADS, reps, log)
    costs = machines(cpu_r, head_costs)

    target, models = pairs()
    prompts = bench_prompts(target, n_prompts)
    greedy = [gpt2.autoregressive_sample(target, p, n_new)[0] for p in prompts]
    drafters, training_records = {"Medusa, untrained": MedusaHeads.untrained(target, N_HEADS)}, {}
    for name, spec in training.items():
        start = time.perf_counter()
        heads, training_records[name] = train_heads(target, spec, prompts)
        drafters[f"Medusa, {name}"] = heads
        log(f"  training, {name}: {time.perf_counter() - start:.0f} s")
    drafters.update({f"draft model: {pair}": model for pair, model in models.items()})
    drafters[NGRAM] = gpt2.NGramDrafter(target.n_vocab)

    rows_ = []
    for name, drafter in drafters.items():
        start = time.perf_counter()
        for temperature in (0.0, 1.0):
            for widths in shapes:
                run = decode(target, drafter, widths, temperature, prompts, n_new)
                row = {"drafter": name, "kind": drafter_kind(name), "temperature": temperature,
                       "widths": list(widths), "chain": is_chain(widths),
                       "nodes": tree_size(widths), "verify_rows": tree_size(widths) + 1,
                       "tau": run["tau"], "tokens": run["tokens"], "rounds": run["rounds"],
                       "drafting_rounds": sum(n > 0 for n in run["nodes_per_round"])}
                if temperature == 0:
                    row["same_as_target"] = run["outputs"] == greedy
                for machine, c in costs.items():
                    row[f"speedup {machine}"] = predicted_speedup(row["kind"], widths, run, c)
                rows_.append(row)
        log(f"  {name}: {time.perf_counter() - start:.0f} s")
    h = gpt2.official_hparams("355M")
    return {"target": str(target.name), "n_prompts": n_prompts, "n_new": n_new,
            "n_heads": N_HEADS, "top": TOP, "weights": "tests/fixtures/tiny-4h: random weights "
            "(a genuine checkpoint): the mechanism, not GPT-2's accuracy",
            "training": training_records, "rows": rows_,
            "costs": {"cpu_r": cpu_r, "heads": head_costs, "shape": {k: h[k] for k in (
                "n_layer", "n_embd", "n_vocab")}, "weights": RANDOM_SHAPES,
                      "h100": {"r": H100_R, "c": H100_C, "source": "docs/gpu.md"}}}


# --- Tables and the figure ----------------------------------------------------------------------


def pct(x) -> str:
    return f"{100 * x:.1f}%"


def training_tables(res) -> str:
    out = ["Training (4 heads, tests/fixtures/tiny-4h, random weights: the mechanism, not GPT-2's "
           "accuracy). Summed loss over the heads, per epoch, training / held out:", "",
           "| text | tokens | sequences (held out) | untrained heads | "
           + " | ".join(f"epoch {e}" for e in (1, 2, 3, 4)) + " | ... last |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, t in res["training"].items():
        cells = [f"{e['training']:.2f} / {e['held_out']:.2f}" for e in t["epochs_loss"][:4]]
        cells += [""] * (4 - len(cells))
        last = t["epochs_loss"][-1]
        tail = f"{len(t['epochs_loss'])}: {last['training']:.2f} / {last['held_out']:.2f}" \
            if len(t["epochs_loss"]) > 4 else ""
        text = (f"{name}: greedy after the decoded prompts" if t["after_prompts"]
                else f"{name}: sampled after single tokens")
        out.append(f"| {text} | {t['tokens']} | {t['sequences']} ({t['held_out_sequences']}) | "
                   f"{t['untrained_training']:.2f} / {t['untrained_held_out']:.2f} | "
                   + " | ".join(cells) + f" | {tail} |")
    out += ["", f"Held out, per head, before -> after training (top-{res['top']}: the token among "
            f"the head's {res['top']} highest logits):", "",
            f"| text | head | rows | loss (nats) | top-1 | top-{res['top']} |",
            "|---|---|---|---|---|---|"]
    for name, t in res["training"].items():
        again, n_held = t["held_out_also_trained_on"], t["held_out_sequences"]
        label = name + (" (memorised: every held-out sequence was trained on)" if t["after_prompts"]
                        else f" (held out; {again} of its {n_held} sequences also trained on)"
                        if again else " (held out)")
        for s in t["heads"]:
            k, b, a = s["head"], s["before"], s["after"]
            head = "LM head (n + 1)" if k == 0 else f"head {k} (n + {k + 1})"
            out.append(f"| {label if k == 0 else ''} | {head} | {b['rows']} | "
                       f"{b['loss']:.3f} -> {a['loss']:.3f} | {pct(b['top1'])} -> "
                       f"{pct(a['top1'])} | {pct(b['top'])} -> {pct(a['top'])} |")
    return "\n".join(out)


def tau_tables(res) -> str:
    out = []
    shapes = list(dict.fromkeys(tuple(r["widths"]) for r in res["rows"]))
    for T in (0.0, 1.0):
        rows = [r for r in res["rows"] if r["temperature"] == T]
        out += [f"Tokens per target forward, T = {T:g} ({res['n_prompts']} prompts, "
                f"{res['n_new']} tokens each)" + (", and whether every greedy text was the "
                "target's own:" if T == 0 else ":"), "",
                "| drafter | " + " | ".join(shape_name(s) for s in shapes)
                + (" | = target's |" if T == 0 else " |"),
                "|---" * (len(shapes) + 1 + (T == 0)) + "|"]
        for name in dict.fromkeys(r["drafter"] for r in rows):
            mine = {tuple(r["widths"]): r for r in rows if r["drafter"] == name}
            cells = [f"{mine[s]['tau']:.2f}" for s in shapes]
            same = ""
            if T == 0:
                same = " | " + ("yes" if all(r["same_as_target"] for r in mine.values()) else "NO")
            out.append(f"| {name} | " + " | ".join(cells) + same + " |")
        out.append("")
    return "\n".join(out).rstrip()


def best(rows, key):
    known = [r for r in rows if r[key] is not None]
    return max(known, key=lambda r: r[key]) if known else None


def cpu_source(res) -> str:
    """Where the CPU column's costs came from: r(T) and c, and h."""
    r = res["costs"]["cpu_r"]
    r = r.get("source", f"measured here ({res.get('machine', {}).get('cpu', 'this CPU')})")
    return f"r(T) and c {r}; h {res['costs']['heads']['this CPU']['source']}"


def speedup_table(res) -> str:
    out = ["Predicted speedup over autoregressive decoding, 355M target's costs and 124M draft's "
           "(best shape of each drafter, its tau; '-': no shape with known costs). CPU: "
           f"{cpu_source(res)}. H100: docs/gpu.md, h estimated with the heads on the device:", "",
           "| drafter | T | CPU | H100 |", "|---|---|---|---|"]
    for name in dict.fromkeys(r["drafter"] for r in res["rows"]):
        for T in (0.0, 1.0):
            rows = [r for r in res["rows"] if r["drafter"] == name and r["temperature"] == T]
            cells = []
            for machine in ("this CPU", "H100"):
                b = best(rows, f"speedup {machine}")
                cells.append("-" if b is None else f"{b[f'speedup {machine}']:.2f}x "
                             f"({shape_name(b['widths'])}, tau {b['tau']:.2f})")
            out.append(f"| {name} | {T:g} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def cost_table(res) -> str:
    c = res["costs"]
    cpu = c["heads"]["this CPU"]
    out = [f"Costs, {c['weights']}: H = {res['n_heads']} heads on one row (MedusaHeads.logits) in "
           "target forwards over one row:", "",
           "| machine | target, 1 row | heads, 1 row | h | source |", "|---|---|---|---|---|"]
    for machine, m in c["heads"].items():
        out.append(f"| {'CPU' if machine == 'this CPU' else machine} | "
                   f"{m['target_ms_T1']:.2f} ms | {m['heads_ms']:.2f} ms | "
                   f"{m['h']:.3f} | {m['source']} |")
    if "verify_extra" in cpu:
        out += ["", f"The verify forward over {cpu['verify_rows']} rows, as the heads' drafter "
                f"runs it (hidden states, then the LM head, every row kept): "
                f"{cpu['verify_heads_ms']:.1f} ms; as a plain tree verify: "
                f"{cpu['verify_plain_ms']:.1f} ms; the extra: {cpu['verify_extra']:+.3f} target "
                f"forwards (other processes' CPU share during the best samples <= "
                f"{cpu['max_foreign_of_best']:.2f})."]
    else:
        out += ["", "The verify forward for the heads (`MedusaHeads.verify`) is model.forward's "
                "own two steps, hidden states then the LM head over every row, with the rows "
                "kept as a view on NumPy: the heads add no product to it (`--heads_cost measure` "
                "times the two)."]
    return "\n".join(out)


def tables(res) -> str:
    return "\n\n".join([training_tables(res), tau_tables(res), speedup_table(res),
                        cost_table(res)])


def plot(res, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    (loss_ax, top_ax, cost_ax), (tau0_ax, tau1_ax, speed_ax) = axes
    for i, (name, t) in enumerate(res["training"].items()):
        e = t["epochs_loss"]
        x = np.arange(len(e) + 1) / len(e)  # the share of its epochs done
        loss_ax.plot(x, [t["untrained_held_out"]] + [s["held_out"] for s in e], "o-", ms=3,
                     color=f"C{i}", label=f"{name}: held out ({len(e)} epochs)")
        loss_ax.plot(x, [t["untrained_training"]] + [s["training"] for s in e], "--",
                     color=f"C{i}", label=f"{name}: training (mean over each epoch)")
        heads = t["heads"][1:]
        k = [s["head"] + 0.1 * (i - 1) for s in heads]
        top_ax.plot(k, [s["after"]["top1"] for s in heads], "o-", color=f"C{i}",
                    label=f"{name}: trained")
        top_ax.plot(k, [s["before"]["top1"] for s in heads], "x:", color=f"C{i}",
                    label=f"{name}: untrained")
    loss_ax.set(xlabel="share of the epochs done (0: untrained)",
                ylabel="summed cross-entropy of 4 heads (nats)",
                title="Training loss and held-out loss")
    loss_ax.legend(fontsize=7)
    top_ax.set(xlabel="head k (guesses n + k + 1)", ylabel="held-out top-1 accuracy",
               xticks=[1, 2, 3, 4], ylim=(0, 1.02),
               title="Per head, held out (memorised: held-out text was trained on)")
    top_ax.legend(fontsize=7)

    heads = res["costs"]["heads"]
    names = list(heads)
    cost_ax.bar(range(len(names)), [heads[m]["h"] for m in names], color=["C0", "C1"])
    for i, m in enumerate(names):
        cost_ax.text(i, heads[m]["h"], f"{heads[m]['heads_ms']:.2f} ms\n"
                     + ("measured" if heads[m]["source"].startswith("measured") else "estimate"),
                     ha="center", va="bottom", fontsize=8)
    cost_ax.set_xticks(range(len(names)), [f"{'CPU' if m == 'this CPU' else m}\n(target "
                                           f"{heads[m]['target_ms_T1']:.2f} ms)" for m in names])
    cost_ax.set(ylabel="heads on one row / target forward over one row",
                ylim=(0, 1.3 * max(heads[m]["h"] for m in names)),
                title=f"The heads' cost h: {res['n_heads']} heads, 355M shape")

    shapes = list(dict.fromkeys(tuple(r["widths"]) for r in res["rows"]))
    style = {"medusa": "-", "model": "--", "ngram": ":"}
    drafters = list(dict.fromkeys(r["drafter"] for r in res["rows"]))
    for ax, T in ((tau0_ax, 0.0), (tau1_ax, 1.0)):
        for i, name in enumerate(drafters):
            rows = {tuple(r["widths"]): r for r in res["rows"]
                    if r["drafter"] == name and r["temperature"] == T}
            ax.plot(range(len(shapes)), [rows[s]["tau"] for s in shapes], marker="o", ms=3,
                    ls=style[rows[shapes[0]]["kind"]], color=f"C{i}", label=name)
        ax.axhline(1, color="black", lw=0.6)
        ax.set_xticks(range(len(shapes)), [shape_name(s) for s in shapes], rotation=45,
                      fontsize=7)
        ax.set(xlabel="chain (K) or tree widths", ylabel="tokens per target forward",
               title=f"Measured on tiny-4h, T = {T:g}")
    tau0_ax.legend(fontsize=7)

    width = 0.2
    for j, (machine, T) in enumerate([(m, T) for m in ("this CPU", "H100") for T in (0.0, 1.0)]):
        values = []
        for name in drafters:
            b = best([r for r in res["rows"] if r["drafter"] == name and r["temperature"] == T],
                     f"speedup {machine}")
            values.append(float("nan") if b is None else b[f"speedup {machine}"])
        label = f"{'CPU' if machine == 'this CPU' else machine}, T = {T:g}"
        speed_ax.barh([i + (j - 1.5) * width for i in range(len(drafters))], values, width,
                      label=label, color=f"C{j}")
    speed_ax.axvline(1, color="black", lw=0.6)
    speed_ax.set_yticks(range(len(drafters)), drafters, fontsize=7)
    speed_ax.invert_yaxis()
    speed_ax.set(xlabel="predicted speedup over autoregressive (best shape)",
                 title="Predicted: tiny-4h's tau at 355M/124M costs")
    speed_ax.legend(fontsize=7)
    fig.suptitle("Medusa heads vs draft models vs n-grams: training and tau on the fixture "
                 "tests/fixtures/tiny-4h (random weights: the mechanism, not GPT-2's accuracy).\n"
                 f"Costs: CPU {cpu_source(res)}; H100 docs/gpu.md, heads on the device "
                 "(estimate)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def write(res, out: Path, img: Path) -> None:
    """medusa.json, the tables on stdout, and the figure (matplotlib)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "medusa.json").write_text(json.dumps(res, indent=1))
    c = res["costs"]["cpu_r"]
    print(f"CPU ({c.get('source', c['weights'])}): c = {c['c']:.3f}; r(T) 355M: "
          + " ".join(f"{T}:{r:.2f}" for T, r in c["r"]["355M"].items())
          + "; 124M: " + " ".join(f"{T}:{r:.2f}" for T, r in c["r"]["124M"].items()))
    machine = res.get("machine", {})
    print(f"ran on: {machine.get('lscpu', {}).get('Model name', machine.get('cpu', '?'))}")
    print()
    print(tables(res))
    plot(res, img / "medusa.png")
    print(f"\nwrote {out / 'medusa.json'} and {img / 'medusa.png'}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m bench medusa",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out", help="where medusa.json goes")
    p.add_argument("--img", default=str(ROOT / "img"), help="where medusa.png goes")
    p.add_argument("--quick", action="store_true", help="6 prompts, 2 repetitions of the costs")
    p.add_argument("--reps", type=int, default=None, help="repetitions of the cost measurements")
    p.add_argument("--cpu_costs", choices=["measure", "performance.md"], default="measure",
                   help="this CPU's r(T) and c: measured now (needs a quiet machine), or the "
                   "table of docs/performance.md (T <= 9)")
    p.add_argument("--heads_cost", choices=["measure", "estimate"], default=None,
                   help="the heads' cost on this CPU: timed now at the 355M shape (needs a quiet "
                   "machine) or estimated from docs/performance.md (default: measure with "
                   "--cpu_costs measure, else estimate)")
    args = p.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        bad_input(f"--reps must be at least 1, not {args.reps}")
    try:  # said before a minute of work, not after it
        import matplotlib  # noqa: F401
    except ImportError:
        bad_input("the figure needs matplotlib (an optional extra): pip install matplotlib")
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    n_prompts, reps = (6, 2) if args.quick else (12, 5)
    heads_cost = args.heads_cost or ("measure" if args.cpu_costs == "measure" else "estimate")
    res = measure(n_prompts, N_NEW, args.reps or reps, log, args.cpu_costs, heads_cost)
    res.update(command=command("medusa", argv), machine=machine_info())
    write(res, Path(args.out), Path(args.img))
    return 0
