"""Offline text for the fine-tuning benchmark: Python functions of installed
packages, each as a pair (first line of its docstring, qualified name and
signature), read with `ast` (nothing is imported or executed). Training and test
pairs come from different packages, so the test measures what carries over.
"""
import ast
import hashlib
import importlib.util
import os
import random

MIN_DOC_CHARS = 20


def package_dirs(name):
    """The folders of package `name`, or [] when it is not installed."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return list(spec.submodule_search_locations)


def _python_files(name):
    files = []
    for root in package_dirs(name):
        for folder, subdirs, names in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if d not in ("tests", "test", "__pycache__"))
            files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    # A fixed shuffle: a package's first files alphabetically are not typical of it.
    files.sort(key=lambda f: hashlib.sha1(os.path.relpath(f, os.path.dirname(
        os.path.dirname(f))).encode()).hexdigest())
    return files


def _signature(node):
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args]
    if args.vararg:
        names.append("*" + args.vararg.arg)
    names += [a.arg for a in args.kwonlyargs]
    if args.kwarg:
        names.append("**" + args.kwarg.arg)
    return "(" + ", ".join(n for n in names if n not in ("self", "cls")) + ")"


def _pairs_of_file(path, module):
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []

    def visit(body, prefix):
        for node in body:
            if isinstance(node, ast.ClassDef):
                visit(node.body, prefix + node.name + ".")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.name.startswith("_"):
                    continue
                doc = ast.get_docstring(node)
                line = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
                if len(line) >= MIN_DOC_CHARS:
                    out.append((line, f"{module}.{prefix}{node.name}{_signature(node)}"))
    visit(tree.body, "")
    return out


def function_pairs(packages, limit):
    """Up to `limit` (docstring line, name + signature) pairs from `packages`, each
    docstring line once; the packages in turn so that none fills the list alone."""
    per_package = []
    for name in packages:
        files = _python_files(name)
        if files:
            per_package.append((name, files))
    if not per_package:
        raise RuntimeError(f"none of the packages {', '.join(packages)} is installed")
    seen, out = set(), []
    share = -(-limit // len(per_package))
    for name, files in per_package:
        taken = 0
        for path in files:
            root = next(r for r in package_dirs(name) if path.startswith(r))
            rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
            module = name if rel == "__init__" else f"{name}.{rel.removesuffix('.__init__')}"
            for doc, code in _pairs_of_file(path, module):
                if doc in seen:
                    continue
                seen.add(doc)
                out.append((doc, code))
                taken += 1
                if taken >= share:
                    break
            if taken >= share:
                break
    random.Random(0).shuffle(out)
    return out[:limit]
