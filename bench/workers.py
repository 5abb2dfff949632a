"""Measurements that need a fresh process: peak memory and load time, OpenBLAS settings, and
Hugging Face transformers. Each runs as `python -m bench.workers NAME ARGS_JSON` and prints one
JSON line.
"""
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import ROOT
from .machine import openblas_core
from .models import DRAFT_SIZE, OFFICIAL, RANDOM, TARGET_SIZE, official_dir, weight_bytes
from .report import print_row
from .verify import forward_costs


def run_worker(name, args, env=None, timeout=900):
    """Run WORKERS[name](args) in a fresh Python, with `env` on top of this environment."""
    cmd = [sys.executable, "-m", "bench.workers", name, json.dumps(args)]
    try:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        environ = {**os.environ, "PYTHONPATH": path, **(env or {})}  # None removes a variable
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             env={k: v for k, v in environ.items() if v is not None})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def proc_status_bytes(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def rss_bytes():
    return proc_status_bytes("VmRSS")


TOKENIZER_FILES = ("encoder.json", "vocab.bpe")


def tokenizer_source(models_dir):
    """A folder with the official tokenizer files, or None: a downloaded model's, else the
    developers' ../shared copy. Only used to make random-weight checkpoint folders loadable."""
    candidates = [Path(models_dir or ROOT / "weights") / size for size in (DRAFT_SIZE, TARGET_SIZE)]
    candidates.append(ROOT.parent / "shared" / "gpt2-tokenizer")
    return next((c for c in candidates if all((c / f).is_file() for f in TOKENIZER_FILES)), None)


def worker_write_random(a):
    """Write random weights in the official shapes AND the official file format (our
    write_checkpoint: a TF tensor bundle, byte for byte what TensorFlow writes) into a folder."""
    import shutil

    import gpt2_numpy as gpt2
    from .checkpoint_writer import write_checkpoint

    h = gpt2.official_hparams(a["size"])
    start = time.perf_counter()
    write_checkpoint(a["folder"], h, gpt2.random_params(h, seed=a["seed"]))
    if a.get("tokenizer"):
        for name in TOKENIZER_FILES:
            shutil.copy(Path(a["tokenizer"]) / name, Path(a["folder"]) / name)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def worker_memory(a):
    """Load both models from checkpoint folders as main.py does, run one token through each
    (which pages every weight in), and report load times and RSS."""
    import gpt2_numpy as gpt2
    from gpt2_numpy.checkpoint import load_checkpoint
    from gpt2_numpy.load import load_hparams

    base = rss_bytes()
    out = {"rss_before_bytes": base}
    models = {}
    for size in (TARGET_SIZE, DRAFT_SIZE):
        folder = Path(a["folders"][size])
        start = time.perf_counter()
        if all((folder / f).is_file() for f in TOKENIZER_FILES):
            # verify=False: a load's own cost, not the one-time CRC-32C check (verify.py), which
            # reads every page of the data file
            models[size] = gpt2.load_model(str(folder), download=False, progress=False,
                                           verify=False)
            what = "load_model (index, memory map, tokenizer)"
        else:  # no tokenizer files on this machine: everything load_model does but the tokenizer
            h = load_hparams(folder)
            models[size] = gpt2.GPT2(h, load_checkpoint(folder, h))
            what = "index and memory map (no tokenizer files here)"
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        models[size]([0], models[size].new_cache(1))  # touches every weight once
        out[size] = {"weights": a["labels"][size], "weight_bytes": weight_bytes(models[size]),
                     "load_s": load_s, "loaded": what,
                     "first_forward_s": time.perf_counter() - start}
    out["rss_after_bytes"] = rss_bytes()
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    out["vm_hwm_bytes"] = proc_status_bytes("VmHWM")  # the same peak, counted for this image only
    print(json.dumps(out))


def memory_section(models_dir):
    """Memory and load time, always from checkpoint files: the official ones where present, else
    random weights written in the official format to a temporary folder (deleted afterwards)."""
    import shutil
    import tempfile

    folders, labels, tmp = {}, {}, None
    try:
        for size, seed in ((TARGET_SIZE, 0), (DRAFT_SIZE, 1)):
            folders[size] = official_dir(size, models_dir)
            labels[size] = OFFICIAL
            if folders[size] is None:
                tmp = tmp or Path(tempfile.mkdtemp(prefix="gpt2-bench-"))
                folders[size] = tmp / size
                labels[size] = "random weights in the official file format: sizes and times are real"
                src = tokenizer_source(models_dir)
                w = run_worker("write_random", {"size": size, "seed": seed, "folder": str(folders[size]),
                                                "tokenizer": str(src) if src else None})
                if "error" in w:
                    return {"error": f"writing a {size} checkpoint failed: {w['error']}"}
        return run_worker("memory", {"folders": {k: str(v) for k, v in folders.items()}, "labels": labels})
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def worker_blas(a):
    """355M forwards of T = 1, 2, 3, 5, 8 and 64 new tokens under this process's OpenBLAS
    environment, with the products' plan for it (kept per environment: products.plan_key)."""
    import gpt2_numpy as gpt2
    from gpt2_numpy.products import attach, describe

    from . import timing

    timing.TRIES = a.get("tries", timing.TRIES)
    h = gpt2.official_hparams(TARGET_SIZE)
    model = gpt2.GPT2(h, gpt2.random_params(h, seed=0))
    products = attach(model)
    model.warm_up()
    Ts = (1, 2, 3, 5, 8, 64)
    costs = forward_costs(model, 64, list(Ts), a["reps"], extra=())
    info = {f"ms_T{T}": 1e3 * costs[T, T]["best"] for T in Ts}
    info.update(core=openblas_core(), plan=describe(products.plan),
                max_foreign=max(c["max_foreign"] for c in costs.values()))
    print(json.dumps(info))


def worker_transformers(a):
    """Hugging Face GPT2LMHeadModel, random init in the same shapes, greedy generate()."""
    try:
        import torch
        import transformers
    except Exception as e:
        print(json.dumps({"skipped": f"torch/transformers not importable in {sys.executable}: "
                                     f"{type(e).__name__}: {e}"}))
        return
    import gpt2_numpy as gpt2

    torch.set_num_threads(a["threads"])
    torch.manual_seed(0)
    device = a.get("device", "cpu")
    rows = []
    for size in a["sizes"]:
        h = gpt2.official_hparams(size)
        config = transformers.GPT2Config(vocab_size=h["n_vocab"], n_positions=h["n_ctx"],
                                         n_embd=h["n_embd"], n_layer=h["n_layer"], n_head=h["n_head"])
        model = transformers.GPT2LMHeadModel(config).eval().float().to(device)
        ids = torch.tensor([np.random.default_rng(0).integers(0, h["n_vocab"], a["prompt"]).tolist()],
                           device=device)
        mask = torch.ones_like(ids)

        for cache in ("static", "default"):
            # static: cache_implementation="static", a preallocated cache like ours (what a user
            # who cares about speed passes); default: transformers' growing DynamicCache
            extra = {"cache_implementation": "static"} if cache == "static" else {}

            def generate(n, model=model, extra=extra):
                with torch.no_grad():
                    start = time.perf_counter()
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                         min_new_tokens=n, do_sample=False, use_cache=True,
                                         pad_token_id=h["n_vocab"] - 1, **extra)
                    if device != "cpu":
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - start
                assert out.shape[1] == a["prompt"] + n
                return seconds

            try:
                generate(2)  # warm-up: first-call allocations
                one = min(generate(1) for _ in range(a["reps"]))  # prefill + the first token
                full = min(generate(a["tokens"]) for _ in range(a["reps"]))
            except Exception as e:  # a transformers without the static cache, say
                rows.append({"model": size, "cache": cache, "error": f"{type(e).__name__}: {e}"})
                continue
            rows.append({"model": size, "cache": cache,
                         "ms_per_token": 1e3 * (full - one) / (a["tokens"] - 1),
                         "prefill_plus_first_ms": 1e3 * one})
        del model
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                      "torch_threads": torch.get_num_threads(), "device": device, "rows": rows}))


def transformers_section(res, worker_args, is_ours=lambda row: True) -> dict:
    """Hugging Face generate() in a fresh process; each of its rows beside our autoregressive
    row of the same size (the first one `is_ours` accepts)."""
    t = run_worker("transformers", worker_args)
    for row in t.get("rows", []):
        if "error" in row:
            print(f"[transformers] {row['model']} {row['cache']} cache: {row['error']}", flush=True)
            continue
        ours = next(r for r in res["autoregressive"] if r["size"] == row["model"] and is_ours(r))
        row["ours_ms_per_token"] = ours["ms_per_token"]
        row["ours_over_theirs"] = ours["ms_per_token"] / row["ms_per_token"]
        row["weights"] = RANDOM
        print_row("transformers", row)
    if "rows" not in t:
        print(f"[transformers] skipped: {t.get('skipped') or t.get('error')}", flush=True)
    return t


WORKERS = {"memory": worker_memory, "write_random": worker_write_random, "blas": worker_blas,
           "transformers": worker_transformers}


def main(argv=None) -> int:
    name, args = sys.argv[1:] if argv is None else argv
    WORKERS[name](json.loads(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
