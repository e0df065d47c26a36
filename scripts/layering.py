#!/usr/bin/env python3
"""Checks the shape rules of docs/architecture.md over every crate of the workspace.

Usage: python3 scripts/layering.py [--report] [ROOT]

Rules (each breach is one line; the exit status is 1 when there is any):
- circle: modules that import each other in a circle. Edges come from `crate::a::b`
  and `super::` paths; an edge is lifted to the two siblings under the pair's lowest
  common ancestor, so a circle between `api::devices` and `api::rollouts` counts as
  well as one between top-level modules. A module using its own parent or child is
  containment, not a circle.
- layer: an import the layer table below forbids (e.g. `storage` importing `api`).
- big-file: a .rs file over 500 lines, its `#[cfg(test)]` part not counted.
- big-fn: a function over 80 lines outside test code.
- string-state: a state compared with a string literal (`== "healthy"`).

With --report the breaches are printed but the exit status is 0.
"""
import collections
import pathlib
import re
import sys

FILE_LIMIT = 500
FN_LIMIT = 80
STATE = re.compile(
    r'(==|!=)\s*"(healthy|unhealthy|failed|attested|open|consumed|expired|manual|auto|'
    r'assigned|installing|installed|rolled_back|quarantined|trial|updating|committed|'
    r'pending|running|paused|completed|aborted|a|b)"'
)
# crate dir -> {module prefix: modules it may not import}
LAYERS = {
    "repo-server": {
        "storage": {"api", "director", "fleet", "repository", "http"},
        "director": {"api"},
        "fleet": {"api"},
        "repository": {"api"},
        # Nothing imports the API layer.
        "http": {"api"},
        "config": {"api"},
        "error": {"api"},
        "ekcert": {"api"},
        "targetfiles": {"api"},
    },
    "update-agent": {
        "install": {"agent", "cli"},
        "boot": {"agent", "cli", "install"},
        "attest": {"agent", "cli", "install"},
        "policy": {"agent", "cli", "install"},
        "director": {"agent", "cli", "install"},
        "updater": {"agent", "cli", "install"},
        "fetch": {"agent", "cli", "install"},
        "health": {"agent", "cli", "install"},
    },
}

# crate dir -> {module prefix: the only crate modules it may import (itself included)}
ONLY = {
    "repo-server": {
        # The bottom layer: protocol and fsio (other crates), its own db, the error type.
        "storage": {"storage", "error"},
    },
    "update-agent": {
        # How commands run and print (Passes, Format): below the agent, policy and CLI.
        "mode": {"mode"},
    },
}


def strip_code(text):
    """Blanks out comments, strings and char literals, keeping line breaks, so that
    braces and keywords are only the code's own."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            end = '"' + m.group(1)
            j = text.find(end, i + len(m.group(0)))
            j = n if j < 0 else j + len(end)
            out.append('""' + re.sub(r"[^\n]", " ", text[i + 2:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('"' + re.sub(r"[^\n]", " ", text[i + 1:j]) + '"')
            i = j + 1
        elif c == "'":
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:])
            if m:
                out.append(" " * len(m.group(0)))
                i += len(m.group(0))
            else:  # a lifetime
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def test_spans(code):
    """Line ranges of `#[cfg(test)]` items (0-based, inclusive)."""
    spans = []
    for m in re.finditer(r"#\[cfg\(test\)\]", code):
        open_at = code.find("{", m.end())
        semi = code.find(";", m.end())
        if open_at < 0 or (0 <= semi < open_at):
            continue
        close = match_brace(code, open_at)
        spans.append((code.count("\n", 0, m.start()), code.count("\n", 0, close)))
    return spans


def match_brace(code, at):
    depth = 0
    for j in range(at, len(code)):
        if code[j] == "{":
            depth += 1
        elif code[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return len(code) - 1


def in_spans(line, spans):
    return any(a <= line <= b for a, b in spans)


def long_functions(code, spans):
    for m in re.finditer(r"\bfn\s+([A-Za-z_][A-Za-z0-9_]*)", code):
        line = code.count("\n", 0, m.start())
        if in_spans(line, spans):
            continue
        # the body starts at the first `{` at paren depth 0 after the signature
        depth, j = 0, m.end()
        while j < len(code):
            ch = code[j]
            if ch in "(<[":
                depth += 1
            elif ch in ")>]":
                depth -= 1
            elif ch == ";" and depth <= 0:
                j = -1
                break
            elif ch == "{" and depth <= 0:
                break
            j += 1
        if j < 0 or j >= len(code):
            continue
        end = code.count("\n", 0, match_brace(code, j))
        length = end - line + 1
        if length > FN_LIMIT:
            yield m.group(1), line + 1, length


def crate_modules(src):
    mods = {}
    for f in sorted(src.rglob("*.rs")):
        parts = list(f.relative_to(src).with_suffix("").parts)
        if parts[-1] in ("mod", "lib", "main"):
            parts = parts[:-1]
        if parts and parts[0] == "bin":
            continue
        mods[tuple(parts)] = f
    return mods


def resolve(path, mods):
    """The longest prefix of a module path that names a module of the crate."""
    for k in range(len(path), 0, -1):
        if tuple(path[:k]) in mods:
            return tuple(path[:k])
    return None


def edges_of(mod, code, mods):
    out = set()
    for m in re.finditer(r"\bcrate((?:::[a-z_][a-z0-9_]*)+)", code):
        target = resolve(m.group(1).strip(":").split("::"), mods)
        if target is not None:
            out.add(target)
    for m in re.finditer(r"\b((?:super::)+)((?:[a-z_][a-z0-9_]*::?)*)", code):
        ups = m.group(1).count("super")
        base = list(mod[:-ups]) if ups <= len(mod) else []
        rest = [p for p in m.group(2).split("::") if p]
        target = resolve(base + rest, mods) or tuple(base)
        out.add(target)
    # `use` of a child declared here: `mod x;` + `x::y` is containment, skip
    out.discard(mod)
    return out


def sibling_edge(a, b):
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    if k == len(a) or k == len(b):
        return None  # one contains the other
    return a[:k + 1], b[:k + 1]


def circles(graph):
    index, low, on, stack, found, counter = {}, {}, set(), [], [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def check(root):
    breaches = []
    crates = sorted(
        p.parent for p in root.rglob("Cargo.toml")
        if (p.parent / "src").is_dir() and "target" not in p.parts and ".venv" not in p.parts
    )
    for crate in crates:
        name = str(crate.relative_to(root))
        src = crate / "src"
        mods = crate_modules(src)
        graph = collections.defaultdict(set)
        for mod, f in mods.items():
            rel = f.relative_to(root)
            raw = f.read_text(errors="replace")
            code = strip_code(raw)
            spans = test_spans(code)
            lines = code.split("\n")
            live = [l for i, l in enumerate(lines) if not in_spans(i, spans)]
            live_code = "\n".join(live)
            if len(live) > FILE_LIMIT and "tests" not in f.parts:
                breaches.append(f"big-file {rel}: {len(live)} lines")
            for fn, line, length in long_functions(code, spans):
                breaches.append(f"big-fn {rel}:{line} {fn}: {length} lines")
            raw_lines = raw.split("\n")
            for i, l in enumerate(raw_lines):
                if in_spans(i, spans):
                    continue
                sm = STATE.search(l)
                if sm and "//" not in l[: sm.start()]:
                    breaches.append(f"string-state {rel}:{i + 1}: {sm.group(0)}")
            rules = LAYERS.get(name, {})
            only = ONLY.get(name, {})
            for target in edges_of(mod, live_code, mods):
                if mod and target and mod[0] in rules and target[0] in rules[mod[0]]:
                    breaches.append(f"layer {name}: {'::'.join(mod)} imports {'::'.join(target)}")
                elif mod and target and mod[0] in only and target[0] not in only[mod[0]]:
                    breaches.append(f"layer {name}: {'::'.join(mod)} imports {'::'.join(target)} (may import only {', '.join(sorted(only[mod[0]]))})")
                pair = sibling_edge(mod, target)
                if pair:
                    graph[pair[0]].add(pair[1])
                    graph.setdefault(pair[1], set())
        for comp in circles(graph):
            breaches.append(f"circle {name}: " + " <-> ".join("::".join(c) for c in comp))
    return breaches


def main(argv):
    report = "--report" in argv
    args = [a for a in argv if a != "--report"]
    root = pathlib.Path(args[0] if args else pathlib.Path(__file__).resolve().parent.parent)
    breaches = check(root)
    for b in breaches:
        print(b)
    kinds = collections.Counter(b.split(" ", 1)[0] for b in breaches)
    summary = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) or "no breaches"
    print(f"layering: {summary}")
    return 0 if report or not breaches else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
