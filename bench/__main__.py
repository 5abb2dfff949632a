"""python -m bench COMMAND [ARGS]: one module per command, each with its own --help."""
import importlib
import sys

COMMANDS = {  # name: module, whose main(argv) runs it and whose docstring's first line says what
    "cpu": "bench.cpu",
    "gpu": "bench.gpu",
    "gpu-check": "bench.gpu_check",
    "adaptive": "bench.adaptive",
    "replay": "bench.replay",
    "plot": "bench.plot",
    "fidelity": "bench.fidelity",
    "host": "bench.host",
    "tree": "bench.tree",
    "products": "bench.products",
    "medusa": "bench.medusa",
}


def usage() -> str:
    lines = ["usage: python -m bench COMMAND [ARGS]   (python -m bench COMMAND --help for ARGS)", ""]
    for name, module in COMMANDS.items():
        doc = importlib.import_module(module).__doc__
        lines.append(f"  {name:<10} {doc.strip().splitlines()[0]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; one of: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
