"""Files over ~300 lines and functions over ~40 (STYLE.md), in the project's own source
(generated stubs left out): ``python -m tests.architecture.sizes [--files N] [--funcs N]``."""

from __future__ import annotations

import argparse
import ast
import sys

from tests.architecture.imports import ROOT, modules


def oversized(max_file: int, max_func: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    files, funcs = [], []
    for path in modules().values():
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        text = path.read_text()
        rel = str(path.relative_to(ROOT))
        n = len(text.splitlines())
        if n > max_file:
            files.append((rel, n))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > max_func:
                    funcs.append((f"{rel}:{node.lineno} {node.name}", length))
    return sorted(files, key=lambda x: -x[1]), sorted(funcs, key=lambda x: -x[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--files", type=int, default=300)
    p.add_argument("--funcs", type=int, default=40)
    args = p.parse_args(argv)
    files, funcs = oversized(args.files, args.funcs)
    for name, n in files:
        print(f"file  {n:4d}  {name}")
    for name, n in funcs:
        print(f"func  {n:4d}  {name}")
    return 1 if files or funcs else 0


if __name__ == "__main__":
    sys.exit(main())
