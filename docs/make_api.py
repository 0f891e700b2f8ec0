"""Writes docs/api.md, the API reference, from the docstrings of every jaxml module.

    python docs/make_api.py          # rewrite docs/api.md
    python docs/make_api.py --check  # exit 1 when docs/api.md is out of date
"""

import argparse
import importlib
import inspect
import os
import pkgutil
import re
import sys

import jaxml

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "api.md")
# Module groups, in page order: (title, what it is for, which modules).
GROUPS = (
    ("Engine (`jaxml.train`)", "the training loop, state, optimizers, devices, checkpoints, logs",
     lambda name: name.startswith("jaxml.train")),
    ("Models (`jaxml.models`)", "pure Flax Linen modules, one file per family",
     lambda name: name.startswith("jaxml.models")),
    ("Data (`jaxml.data`)", "TFDS sources, grain pipelines, offline builders, augmentation",
     lambda name: name.startswith("jaxml.data")),
    ("Config, CLI and launch", "configs, the command line, multi-host start-up, compilation cache, preflight",
     lambda name: name in ("jaxml.config", "jaxml.cli", "jaxml.runtime", "jaxml.preflight")),
    ("Building blocks", "losses, metrics, sampling and the pieces experiments share",
     lambda name: True),
)


def modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(jaxml.__path__, "jaxml.")]
    return sorted(n for n in names if not n.rsplit(".", 1)[-1].startswith("_"))


def _first_paragraph(doc: str | None) -> str:
    return inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ") if doc else ""


def _signature(obj) -> str:
    try:
        signature = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    # Defaults without a repr of their own (Flax's parent sentinel, initializer functions)
    # print their address: drop it, so the page changes only when an API does.
    return re.sub(r" (?:object )?at 0x[0-9a-f]+>", ">", signature)


def describe(name: str) -> list[str]:
    """The markdown lines of one module: its docstring, then its public functions and classes."""
    lines = [f"### `{name}`", ""]
    try:
        module = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 -- an optional dependency missing here (e.g. torch)
        return lines + [f"*Not importable where this page was made ({type(e).__name__}: {e}).*", ""]
    if module.__doc__:
        lines += [_first_paragraph(module.__doc__), ""]
    public = [(k, v) for k, v in vars(module).items() if not k.startswith("_")
              and (inspect.isfunction(v) or inspect.isclass(v)) and getattr(v, "__module__", None) == name]
    for key, obj in public:
        kind = "class" if inspect.isclass(obj) else "def"
        doc = _first_paragraph(obj.__doc__)
        if inspect.isclass(obj) and doc.startswith(key + "("):  # a dataclass's generated docstring
            doc = ""
        lines.append(f"- `{kind} {key}{_signature(obj)}`" + (f" — {doc}" if doc else ""))
    if len(lines) == 2:  # a package whose modules are listed on their own
        return []
    return lines + [""]


def render() -> str:
    out = ["# jaxml API", "",
           "Generated from the docstrings by `python docs/make_api.py`; the design behind it is in "
           "`shared/DESIGN.md`, launching in `launch/README.md`.", ""]
    remaining = modules()
    for title, purpose, member in GROUPS:
        chosen = [n for n in remaining if member(n)]
        remaining = [n for n in remaining if n not in chosen]
        out += [f"## {title}", "", f"{purpose[0].upper()}{purpose[1:]}.", ""]
        for name in chosen:
            out += describe(name)
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/api.md is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = open(OUT).read() if os.path.exists(OUT) else ""
        if current != text:
            print("docs/api.md is out of date: run python docs/make_api.py", file=sys.stderr)
            return 1
        return 0
    with open(OUT, "w") as f:
        f.write(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
