"""Which array library the model runs on.

The forward pass never imports NumPy for its arithmetic: it asks the weights which namespace they
belong to (`namespace_of`) and calls that namespace's functions. NumPy arrays give `numpy`, CuPy
arrays give `cupy`, and any array implementing the Array API standard gives its own namespace
(the tests run the model through `array_api_strict` to prove there is no NumPy-only path).
Only array-API functions are used: `matmul`, `exp`, `tanh`, `sqrt`, `max`, `sum`, `mean`,
`reshape`, `permute_dims`, `take`, `where`, `arange`, `zeros`, `asarray`, `argmax`.

Sampling runs on the host in NumPy, so logits cross the boundary through `to_numpy`, once per
forward and only for the rows that will be sampled from.
"""
import numpy as np


def library_of(x) -> str:
    """The top-level package whose array type `x` is: "numpy", "cupy", ..."""
    return type(x).__module__.split(".")[0]


def namespace_of(x):
    """The array namespace (module) that `x` belongs to."""
    if isinstance(x, np.ndarray) or library_of(x) == "numpy":  # subclasses of ndarray too
        return np
    if library_of(x) == "cupy":
        import cupy

        return cupy
    return x.__array_namespace__()


def to_numpy(x) -> np.ndarray:
    """Copy an array of any backend to a host NumPy array (a no-op view for NumPy)."""
    if isinstance(x, np.ndarray):
        return x
    if library_of(x) == "cupy":  # an explicit device -> host copy (np.asarray would raise)
        return x.get()
    return np.from_dlpack(x)  # any other Array-API library


def synchronize(x) -> None:
    """Wait until the device has finished the work queued on it (GPU calls are asynchronous,
    so a timer stopped before this measures only the launch). A no-op on the CPU."""
    if library_of(x) == "cupy":
        import cupy

        cupy.cuda.get_current_stream().synchronize()
