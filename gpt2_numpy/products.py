"""How a CPU multiplies a few rows by a weight matrix: a speed layer attached to a loaded model.

model.py multiplies by its weights with `x @ w`. `attach(model)` views each weight matrix of a
NumPy model (the blocks' four and the tied LM head, wte) as a `PlannedMatrix`: the same bytes,
no copy, as a subclass of ndarray whose `__rmatmul__` Python calls for `x @ w` (a subclass's
reflected method goes first), so the product follows a plan while model.py stays `x @ w + b`.
For T rows, x [T, n] @ w [n, m], there are several ways to get the same numbers:

    "one"     one product over the T rows as they are
    "pad4"    one product over the rows padded with zero rows to 4 (8, 16 for "pad8", "pad16");
              the zero rows' results are dropped
    "rows"    T one-row products (matrix-vector products), one after the other
    "blocks"  the same T one-row products, a block of w at a time: each ~BLOCK_BYTES block is
              read from memory by the first row and from the cache by the others

They differ only in float32 rounding, not in value, but in speed: a one-row product only streams
w from memory, while a product over several rows first copies ("packs") w and then multiplies,
and row counts that do not fill the BLAS's kernels take slower paths. Which is fastest for each T
depends on the CPU, its caches and its BLAS, so `Products.measure` times the options on the
model's own matrices and `plan` records the choice: {T: option}. Row counts not in the plan
(long prompts) get "one". A plan is measured once per machine and model shape and kept in a
file (`plans_path`); docs/performance.md has the figures and what they were measured on.

Only NumPy arrays are handled this way; other backends (CuPy's cuBLAS) get `x @ w` as it is, and
so do batched [B, T, n] @ [B, n, m] products.
"""
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

OPTIONS = ("one", "pad4", "pad8", "pad16", "rows", "blocks")

PAD_ROWS_TO = 8  # without a measurement: 2..7 rows padded to 8, cheaper than 5-7 on OpenBLAS

DEFAULT_PLAN = {T: "pad8" if 1 < T < PAD_ROWS_TO else "one" for T in range(1, 17)}

PLANNED_ROWS = range(1, 17)  # the row counts a forward has in decoding (K + 1, catch-ups)

# "blocks": the block size measured best on the 2-core Xeon of docs/performance.md (its L2 is
# 2 MiB a core); blocks of 1.25-1.75 MiB were much slower there, 2.5-3 MiB a little.
BLOCK_BYTES = 2 << 20


def padded_to(option: str) -> int:
    """The number of rows an option pads to: "pad8" -> 8."""
    return int(option[len("pad"):])


def multiply(x, w, option: str):
    """x @ w computed the way `option` says.  [T, n] @ [n, m] -> [T, m]"""
    T = x.shape[0]
    if option == "rows":
        out = np.empty((T, w.shape[1]), dtype=np.result_type(x, w))  # [T, m]
        for t in range(T):
            np.matmul(x[t : t + 1, :], w, out=out[t : t + 1, :])  # [1, n] @ [n, m] -> [1, m]
        return out
    if option == "blocks":
        return multiply_by_blocks(x, w)
    if option == "one" or padded_to(option) <= T:
        return x @ w
    padded = np.zeros((padded_to(option), x.shape[1]), dtype=x.dtype)  # [P, n], rows T.. zero
    padded[:T, :] = x
    return (padded @ w)[:T, :]  # [P, m] -> [T, m]


def multiply_by_blocks(x, w):
    """x @ w as T one-row products over blocks of w that fit a core's cache, so that w is read
    from memory once, not T times.  [T, n] @ [n, m] -> [T, m]
    Blocks follow w's layout: groups of whole rows of a row-major w (each row of x adds its share
    of the sum), groups of whole columns of a column-major one (wte.T: each block gives whole
    outputs)."""
    T, (n, m) = x.shape[0], w.shape
    out = np.zeros((T, m), dtype=np.result_type(x, w))  # [T, m]
    if w.flags.f_contiguous and not w.flags.c_contiguous:
        b = max(1, BLOCK_BYTES // (n * w.itemsize))  # columns per block
        for j in range(0, m, b):
            for t in range(T):
                np.matmul(x[t : t + 1, :], w[:, j : j + b], out=out[t : t + 1, j : j + b])
        return out
    b = max(1, BLOCK_BYTES // (m * w.itemsize))  # rows per block
    for i in range(0, n, b):
        for t in range(T):
            out[t] += x[t, i : i + b] @ w[i : i + b, :]  # [b] @ [b, m] -> [m], a partial sum
    return out


def options_for(T: int):
    """The options timed for T rows: one row has one way; more rows are padded to the next of 4,
    8, 16 above T, and 2-3 rows to 8 as well (8 rows fill OpenBLAS's kernels: padding them, or
    fewer rows, to 16 was never the fastest)."""
    if T == 1:
        return ("one",)
    pads = [o for o in ("pad4", "pad8", "pad16") if padded_to(o) > T and (o != "pad16" or T > 8)]
    pads = pads[: 2 if T < 4 else 1]
    return ("one", *pads, "rows", *(("blocks",) if T <= 4 else ()))


class Products:
    """matmul(x, w) with a plan {T: option} for each number of rows T."""

    def __init__(self, plan: dict = None):
        self.plan = dict(DEFAULT_PLAN if plan is None else plan)
        self.timings = {}  # {(T, option): seconds} from the last `measure`, for the record

    def __call__(self, x, w):
        if not isinstance(x, np.ndarray) or x.ndim != 2:
            return x @ w  # another backend, or a batched product (attention)
        return multiply(x, w, self.plan.get(x.shape[0], "one"))

    def measure(self, matrices, Ts=PLANNED_ROWS, reps: int = 5, clock=time.perf_counter) -> dict:
        """Time each option of each T on `matrices` (weights [n, m], in the order a forward
        multiplies them), everything interleaved and the best of `reps` kept; plan the fastest
        (`choose`), then `confirm` every choice that is not DEFAULT_PLAN's. "rows" is not timed
        for T once it lost by more than half at T - 1: its cost only grows with T. Returns the
        plan, which stays as it was for matrices of another backend."""
        if not all(isinstance(w, np.ndarray) for w in matrices):
            return self.plan
        matrices = [np.asarray(w) for w in matrices]  # plain arrays: x @ w as it is
        rng = np.random.default_rng(0)
        inputs = {n: rng.standard_normal((max(Ts), n)).astype(matrices[0].dtype)
                  for n in {w.shape[0] for w in matrices}}  # [T_max, n] for each input width

        def seconds(T, option):  # one step's products of T rows, the `option` way
            start = clock()
            for w in matrices:
                multiply(inputs[w.shape[0]][:T, :], w, option)
            return clock() - start

        timings = {}
        for _ in range(reps):
            for T in Ts:
                for option in options_for(T):
                    if option == "rows" and not rows_in_play(timings, T):
                        continue
                    s = seconds(T, option)
                    timings[T, option] = min(s, timings.get((T, option), s))
        self.timings = timings
        self.plan = confirm(choose(timings), lambda T, option: min(
            seconds(T, option) for _ in range(reps)))
        return self.plan

    def __repr__(self):
        return f"Products(plan={describe(self.plan)})"


def confirm(plan: dict, seconds) -> dict:
    """The plan, with every T whose option is not DEFAULT_PLAN's timed again against the default
    (seconds(T, option): a fresh best time): an option that is not faster again goes back to the
    default. A hiccup while the default was timed can make another way look faster; it is
    unlikely to happen twice, so a plan is never much slower than the default anywhere."""
    confirmed = dict(plan)
    for T, option in plan.items():
        default = DEFAULT_PLAN.get(T, "one")
        if option != default:
            mine, theirs = seconds(T, option), seconds(T, default)
            if mine >= theirs:
                confirmed[T] = default
    return confirmed


def choose(timings: dict, margin: float = 0.05) -> dict:
    """{T: option} from {(T, option): seconds}: the fastest option, unless DEFAULT_PLAN's option
    was timed too and the fastest is not `margin` faster than it (a near tie on a noisy machine
    is no reason to change)."""
    plan = {}
    for T in sorted({T for T, _ in timings}):
        times = {option: s for (t, option), s in timings.items() if t == T}
        fastest = min(times, key=times.get)
        default = DEFAULT_PLAN.get(T, "one")
        keep = default in times and times[fastest] > (1 - margin) * times[default]
        plan[T] = default if keep else fastest
    return plan


def rows_in_play(timings: dict, T: int) -> bool:
    """Whether T one-row products are worth timing: for 2 rows, yes; for more, only if they were
    timed for T - 1 rows and took at most 1.5x the fastest other option there."""
    if T <= 2:
        return True
    others = [s for (t, option), s in timings.items() if t == T - 1 and option != "rows"]
    return (T - 1, "rows") in timings and timings[T - 1, "rows"] <= 1.5 * min(others)


def describe(plan: dict) -> str:
    """A plan in a line: runs of T with the same option, "1: one, 2-3: rows, 4-16: pad8"."""
    runs = []
    for T in sorted(plan):
        if runs and runs[-1][2] == plan[T] and runs[-1][1] == T - 1:
            runs[-1][1] = T
        else:
            runs.append([T, T, plan[T]])
    return "{" + ", ".join(f"{a}: {o}" if a == b else f"{a}-{b}: {o}" for a, b, o in runs) + "}"


NAMES = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))


def weight_matrices(params: dict, n_layers: int = 2) -> list:
    """What `measure` times: the weight matrices of the first `n_layers` blocks (all if None) and
    as large a share of the tied LM head (wte.T, a column-major view) as those blocks are of all
    blocks, in the order a forward multiplies them. A few blocks keep a warm-up short; every
    block's matrices have the same shapes, so they cost the same."""
    blocks = params["blocks"][:n_layers]
    ws = [block[a][b]["w"] for block in blocks for a, b in NAMES]
    V = params["wte"].shape[0]
    return ws + [params["wte"][: V * len(blocks) // len(params["blocks"]), :].T]  # [d, V share]


class PlannedMatrix(np.ndarray):
    """A weight matrix whose products with few rows follow `products`' plan. For `x @ w`, Python
    asks w first (its type is a subclass of x's), and w hands the product to the plan; for
    everything else (w + b, the embedding lookup xp.take(wte, ids)) it is a plain ndarray, and
    what it gives back is plain too. `w.T` is planned as well (the LM head multiplies by it)."""

    def __array_finalize__(self, obj):
        self.products = getattr(obj, "products", None)

    def __rmatmul__(self, x):  # x @ self
        return self.products(x, self.view(np.ndarray))

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = tuple(np.asarray(a) if isinstance(a, PlannedMatrix) else a for a in inputs)
        return getattr(ufunc, method)(*inputs, **kwargs)

    def take(self, *args, **kwargs):
        return self.view(np.ndarray).take(*args, **kwargs)


def planned(params: dict, products: Products) -> dict:
    """The parameter tree with wte and every block's weight matrix viewed as a PlannedMatrix of
    `products` (the same bytes, no copy); the rest as it was."""
    def view(w):
        w = w.view(PlannedMatrix)
        w.products = products
        return w

    def planned_block(block):
        block = {**block, "attn": dict(block["attn"]), "mlp": dict(block["mlp"])}
        for a, b in NAMES:
            block[a][b] = {**block[a][b], "w": view(block[a][b]["w"])}
        return block

    return {**params, "wte": view(params["wte"]),
            "blocks": [planned_block(block) for block in params["blocks"]]}


def products_of(model):
    """The Products a model's weights follow (None: plain `x @ w`)."""
    return getattr(model.params["wte"], "products", None)


def attach(model, progress: bool = False):
    """Make a NumPy model's weight products follow a plan measured on this machine for matrices
    of its shapes: the plan kept in plans_path() if there is one, else measured now (a second
    or so for 355M, once) and kept. Returns the Products (None, and nothing changed, for a
    model on another backend)."""
    if not isinstance(model.params["wte"], np.ndarray):
        return None
    matrices = weight_matrices(model.params)
    key = plan_key(matrices)
    plan = stored_plan(key)
    products = Products(plan)
    if plan is None:
        if progress:
            print(f"Timing how this CPU multiplies a few rows by {model.name}'s weights, once "
                  f"for this machine and model shape (kept in {plans_path()})", file=sys.stderr)
        store_plan(key, products.measure(matrices))
    model.params = planned(model.params, products)
    return products


def plans_path():
    """Where measured plans are kept: $GPT2_NUMPY_CACHE/products.json, else under
    $XDG_CACHE_HOME/gpt2_numpy, else ~/.cache/gpt2_numpy."""
    folder = os.environ.get("GPT2_NUMPY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "gpt2_numpy")
    return Path(folder) / "products.json"


def plan_key(matrices) -> dict:
    """What a plan depends on: the CPU, the cores this process may use, NumPy and its BLAS
    with their settings, and the matrices' shapes, dtypes and layouts."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # NumPy < 1.26 has no dicts
        blas = "unknown"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    settings = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS",
                                           "OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    return {"cpu": cpu, "machine": platform.machine(), "cores": cores, "numpy": np.__version__,
            "blas": blas, "settings": settings,
            "matrices": [[*w.shape, str(w.dtype), "F" if w.flags.f_contiguous
                          and not w.flags.c_contiguous else "C"] for w in matrices]}


def read_plans() -> list:
    try:
        entries = json.loads(plans_path().read_text())
        return [e for e in entries if isinstance(e, dict) and "key" in e and "plan" in e]
    except (OSError, ValueError, TypeError):  # none yet, or unreadable: measure again
        return []


def stored_plan(key: dict):
    """The plan kept for `key`, or None."""
    for entry in read_plans():
        if entry["key"] == key and isinstance(entry["plan"], dict):
            plan = {int(T): option for T, option in entry["plan"].items()}
            if set(plan.values()) <= set(OPTIONS):
                return plan
    return None


def store_plan(key: dict, plan: dict) -> None:
    """Keep `plan` for `key` (replacing an older one), written whole or not at all; a folder
    that cannot be written only means the plan is measured again next time."""
    entries = [e for e in read_plans() if e["key"] != key] + [{"key": key, "plan": plan}]
    path = plans_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f"{path.name}.{os.getpid()}.part")
        part.write_text(json.dumps(entries, indent=1))
        os.replace(part, path)
    except OSError:
        pass
