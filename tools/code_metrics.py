"""Size figures of the product code (onnxopt/ and passes/): files, lines, non-blank non-comment
lines, the longest functions and which exceed 80 lines (the torch converter's
``OnnxModule.__init__``, one table of op lowerings, is exempt).

  python tools/code_metrics.py [ROOT]      # ROOT: a checkout (default: this one)
"""
import ast
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parents[1])
files = sorted(list((root / "onnxopt").rglob("*.py")) + list((root / "passes").rglob("*.py")))
lines = code = 0
funcs = []
for path in files:
    src = path.read_text()
    lines += len(src.splitlines())
    code += sum(1 for l in src.splitlines() if l.strip() and not l.strip().startswith("#"))
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            funcs.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root)}:{node.name}"))
funcs.sort(reverse=True)
print(f"files {len(files)}  lines {lines}  non-blank non-comment {code}")
print("longest: " + ", ".join(f"{name} {n}" for n, name in funcs[:8]))
EXEMPT = {"onnxopt/torch/convert.py:__init__"}
over = [f"{name} {n}" for n, name in funcs if n > 80 and name not in EXEMPT]
print(f"functions over 80 lines (torch converter exempt): {len(over)}" + (": " + ", ".join(over) if over else ""))
